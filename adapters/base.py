"""The adapter contract: everything editkit knows about one architecture family.

A subclass declares where things live (dotted paths, relative to the model or to one
decoder block), how linear weights are stored, and how the QKV projection is laid out.
Nothing outside adapters/ looks at module names or model types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from editkit.errors import InvalidRequest
from editkit.sites import LAYER_COMPONENTS, Site


class _Captured(Exception):
    """Raised by a capture hook to end a forward pass once everything asked for is in."""


class Adapter:
    # Declared by each family.
    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = ""  # ModuleList of decoder blocks, from the model root
    embed_path: ClassVar[str] = ""
    final_norm_path: ClassVar[str] = ""
    unembed_path: ClassVar[str] = ""
    # Paths relative to one block.
    block_paths: ClassVar[dict[str, str]] = {}
    # True where linear weights are stored (in, out) as in GPT-2's Conv1D.
    transposed_weights: ClassVar[bool] = False
    # "separate" (q/k/v projections), "fused" ([q|k|v] blocks), "interleaved" (per head q,k,v)
    qkv_layout: ClassVar[str] = "separate"
    # Rotary position embedding module (from the model root), for families that use one.
    rotary_path: ClassVar[str | None] = None
    # The final norm: LayerNorm subtracts the mean (centers), RMSNorm does not; the name of
    # the attribute holding its epsilon.
    final_norm_centers: ClassVar[bool] = True
    final_norm_eps_attr: ClassVar[str] = "eps"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ---- shape facts -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads)

    # ---- resolution --------------------------------------------------------------------
    def layer_index(self, layer: int | float) -> int:
        """Index, negative index, or fraction of depth -> a concrete layer index."""
        n = self.num_layers
        if isinstance(layer, float):
            if not 0.0 <= layer <= 1.0:
                raise InvalidRequest(f"fractional layer must lie in [0, 1], got {layer}")
            return int(round(layer * (n - 1)))
        index = layer + n if layer < 0 else layer
        if not 0 <= index < n:
            raise InvalidRequest(f"layer {layer} out of range for a model with {n} layers")
        return index

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    def module(self, site: Site) -> nn.Module:
        if site.component in LAYER_COMPONENTS:
            block = self.blocks()[self.layer_index(site.layer)]
            key = "block" if site.component == "block.out" else site.component
            key = "attn.out" if key == "attn.heads" else key
            if key == "block":
                return block
            path = self.block_paths.get(key)
            if path is None:
                raise InvalidRequest(f"{type(self).__name__} has no component '{site.component}'")
            return block.get_submodule(path)
        path = {"embed": self.embed_path, "final_norm": self.final_norm_path,
                "unembed": self.unembed_path}[site.component]
        return self.model.get_submodule(path)

    # ---- weights -----------------------------------------------------------------------
    def weight(self, site: Site) -> torch.Tensor:
        """The linear weight at `site` as an (out, in) view; writes through it change the model."""
        w = self.module(site).weight
        return w.t() if self.transposed_weights and site.component not in ("embed", "unembed") else w

    def device(self, site: Site) -> torch.device:
        """The device the module at `site` computes on (its inputs and outputs live there),
        whether its weights are in memory or offloaded by a device map."""
        from editkit.model import execution_device

        return execution_device(self.module(site))

    def offloaded(self, site: Site) -> bool:
        """Whether the module at `site` keeps its weights offloaded (meta between calls)."""
        return any(p.device.type == "meta" for p in self.module(site).parameters())

    def weight_values(self, site: Site) -> torch.Tensor:
        """A copy of the (out, in) weight at `site` with its values, offloaded or not."""
        from editkit.model import materialized

        module = self.module(site)
        with materialized(module):
            return self.weight(site).detach().clone()

    def stored(self, site: Site, weight: torch.Tensor) -> torch.Tensor:
        """An (out, in) weight for `site` in the orientation its module stores (the inverse of
        weight()), e.g. to write an edited weight into a checkpoint."""
        return weight.t() if self.transposed_weights and site.component not in ("embed", "unembed") else weight

    def linear_features(self, site: Site) -> tuple[int, int]:
        """(in_features, out_features) of the linear layer at `site`."""
        out_f, in_f = self.weight(site).shape
        return in_f, out_f

    # ---- heads -------------------------------------------------------------------------
    def head_slice(self, head: int) -> slice:
        """Slice of the attention output projection's input that belongs to `head`."""
        if not 0 <= head < self.num_heads:
            raise InvalidRequest(f"head {head} out of range ({self.num_heads} heads)")
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def qkv_slices(self, layer: int | float, head: int) -> dict[str, tuple[nn.Module, slice]]:
        """For `head`, the (module, output-feature slice) of its query, key and value.

        Key and value heads are shared under grouped-query attention."""
        hd, nh = self.head_dim, self.num_heads
        kv = head // (nh // self.num_kv_heads)
        index = self.layer_index(layer)
        block = self.blocks()[index]
        if self.qkv_layout == "separate":
            return {
                "q": (block.get_submodule(self.block_paths["attn.q"]), slice(head * hd, (head + 1) * hd)),
                "k": (block.get_submodule(self.block_paths["attn.k"]), slice(kv * hd, (kv + 1) * hd)),
                "v": (block.get_submodule(self.block_paths["attn.v"]), slice(kv * hd, (kv + 1) * hd)),
            }
        fused = block.get_submodule(self.block_paths["attn.qkv"])
        if self.qkv_layout == "fused":  # [all q | all k | all v]
            width = nh * hd
            return {part: (fused, slice(i * width + head * hd, i * width + (head + 1) * hd))
                    for i, part in enumerate("qkv")}
        if self.qkv_layout == "interleaved":  # per head: [q_h | k_h | v_h]
            base = head * 3 * hd
            return {part: (fused, slice(base + i * hd, base + (i + 1) * hd)) for i, part in enumerate("qkv")}
        raise InvalidRequest(f"unknown qkv layout '{self.qkv_layout}'")

    # ---- partial forward passes ------------------------------------------------------
    def block_kwargs(self, hidden: torch.Tensor, attention_mask, position_ids: torch.Tensor) -> dict:
        """Keyword arguments a decoder block takes besides the hidden state (no KV cache).

        `attention_mask` is the prepared (4-D or None) causal mask. Families with rotary
        embeddings get the (cos, sin) pair their model computes once per forward pass."""
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
        if self.rotary_path:
            rotary = self.model.get_submodule(self.rotary_path)
            kwargs["position_embeddings"] = rotary(hidden, position_ids=position_ids)
        return kwargs

    def run_blocks(self, hidden: torch.Tensor, start: int, attention_mask: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, final_norm: bool = True) -> torch.Tensor:
        """Run decoder blocks `start`..end on `hidden`, the residual stream entering block
        `start` (B, T, H), as the model's own forward would (right padding, no KV cache); then
        the final norm. Lets a caller that knows the stream below a layer skip recomputing it."""
        from transformers.masking_utils import create_causal_mask

        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        kwargs = self.block_kwargs(hidden, mask, position_ids)
        for block in self.blocks()[self.layer_index(start) if start < self.num_layers else start:]:
            out = block(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if final_norm:
            hidden = self.model.get_submodule(self.final_norm_path)(hidden)
        return hidden

    def capture(self, inputs: Mapping[str, Any], points: Mapping[str, tuple[Site, str]],
                stop: bool = True) -> tuple[dict[str, torch.Tensor], Any]:
        """Run the model on `inputs` (keyword arguments of its forward) and capture, for each
        name in `points`, the input ("in") or output ("out": the hidden states of a tuple)
        of the module at a Site, detached. With `stop`, the pass ends as soon as every point
        is captured (nothing above the last one runs) and the model output is None;
        otherwise it is the model's output. Hooks the components installed run as usual."""
        got: dict[str, torch.Tensor] = {}
        handles = []

        def keep(name, value):
            got[name] = value.detach()
            if stop and len(got) == len(points):
                raise _Captured

        try:
            for name, (site, where) in points.items():
                module = self.module(site)
                if where == "in":
                    def pre(mod, args, kwargs, _name=name):
                        keep(_name, args[0] if args else next(iter(kwargs.values())))
                    handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                elif where == "out":
                    def post(mod, args, output, _name=name):
                        keep(_name, output[0] if isinstance(output, tuple) else output)
                    handles.append(module.register_forward_hook(post))
                else:
                    raise ValueError(f"capture point '{name}': where must be 'in' or 'out', not {where!r}")
            try:
                output = self.model(**inputs)
            except _Captured:
                output = None
        finally:
            for handle in handles:
                handle.remove()
        missing = set(points) - set(got)
        if missing:
            raise RuntimeError(f"capture points never reached: {sorted(missing)}")
        return got, output

    def final_norm_parts(self) -> tuple[torch.Tensor, torch.Tensor | None, float, bool]:
        """(weight, bias or None, epsilon, whether it centers) of the final norm, for methods
        that linearise it (PH3's direct-path scores)."""
        from editkit.model import materialized

        norm = self.module(Site("final_norm"))
        eps = getattr(norm, self.final_norm_eps_attr, None)
        with materialized(norm):
            weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
            weight = None if weight is None else weight.detach().clone()
            bias = None if bias is None else bias.detach().clone()
        if eps is None or weight is None:
            raise InvalidRequest(f"{type(self).__name__}: the final norm {type(norm).__name__} has no weight "
                                 f"or '{self.final_norm_eps_attr}'")
        return weight, bias, float(eps), self.final_norm_centers

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for final-normed hidden states (any leading shape)."""
        return self.model.get_submodule(self.unembed_path)(hidden)

    def describe(self) -> dict:
        return {"adapter": type(self).__name__, "model_type": self.config.model_type,
                "layers": self.num_layers, "hidden": self.hidden_size, "heads": self.num_heads,
                "kv_heads": self.num_kv_heads, "head_dim": self.head_dim}
