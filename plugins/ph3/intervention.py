"""The PH3 intervention: prune attention heads by masking their slice of the attention
output projection's input (a forward pre-hook), so it works with every attention
implementation (eager, SDPA, flash) and never changes a weight."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from editkit.components import Intervention
from editkit.errors import InvalidRequest, WorkspaceError
from editkit.model import LoadedModel
from editkit.sites import Site

from .config import PH3Config

STATE_FORMAT = 1


def heads_tensor(heads: Iterable[tuple[int, int]] | torch.Tensor) -> torch.Tensor:
    """(n, 2) int64 tensor of (layer, head) pairs."""
    if isinstance(heads, torch.Tensor):
        return heads.reshape(0, 2) if heads.numel() == 0 else heads  # validate_heads checks the rest
    rows = [(int(layer), int(head)) for layer, head, *_ in heads]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


def head_mask(adapter, heads: list[int], features: int) -> torch.Tensor:
    """Boolean (features,) mask, True on the given heads' slices of the output projection's input."""
    mask = torch.zeros(features, dtype=torch.bool)
    for head in heads:
        mask[adapter.head_slice(head)] = True
    return mask


class HeadPruning(Intervention):
    """Zeroes the chosen heads' outputs before the attention output projection."""

    name = "ph3"
    Config = PH3Config
    description = ("PH3: prune memory or context attention heads (masked output-projection input) to choose "
                   "whether the model follows its memory or a conflicting context")

    def attach(self) -> None:
        self.heads = torch.zeros((0, 2), dtype=torch.int64)
        self.meta: dict[str, Any] = {}
        self.attached = True

    @classmethod
    def state_from_file(cls, path, options, loaded):
        """From a heads file of `editkit ph3 locate`: options favour (memory | context,
        required) and k (default: the k chosen on the validation split)."""
        from .pipeline import heads_to_prune, read_heads, state_for

        options = dict(options)
        favour, k = options.pop("favour", None), options.pop("k", None)
        if favour is None:
            raise InvalidRequest("ph3 needs --config favour=memory (prune context heads) or favour=context")
        if options:
            raise InvalidRequest(f"ph3 takes favour and k with a heads file, not {', '.join(sorted(options))}")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise InvalidRequest(f"ph3 k must be a whole number of at least 1, got {k!r}")
        doc = read_heads(path)
        if loaded.fingerprint != doc.get("fingerprint"):
            raise WorkspaceError(f"heads file {path} was located on other weights (fingerprint "
                                 f"{doc.get('fingerprint')}, workspace model {loaded.fingerprint})")
        chosen, k = heads_to_prune(doc, favour, k)
        return state_for(chosen, favour, k, source=f"{Path(path).name} k={k}")

    def folded_weights(self) -> dict[str, torch.Tensor]:
        """Zeroing a head's slice of the output projection's input is zeroing those columns
        of its weight: exact."""
        from editkit.export import parameter_name

        by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads.tolist():
            by_layer.setdefault(layer, []).append(head)
        out = {}
        for layer, heads in by_layer.items():
            site = Site("attn.out", layer)
            module = self.adapter.module(site)
            weight = self.adapter.weight_values(site)  # (out, in)
            weight[:, head_mask(self.adapter, heads, weight.shape[1]).to(weight.device)] = 0
            out[parameter_name(self.model, module.weight)] = self.adapter.stored(site, weight)
        return out

    # ---- heads -------------------------------------------------------------------------
    def validate_heads(self, heads: torch.Tensor) -> torch.Tensor:
        if heads.dim() != 2 or heads.shape[1] != 2 or heads.dtype not in (torch.int64, torch.int32):
            raise InvalidRequest(f"ph3 heads must be an integer (n, 2) tensor of (layer, head), got "
                                 f"{tuple(heads.shape)} {heads.dtype}")
        layers, nheads = self.adapter.num_layers, self.adapter.num_heads
        pairs = [tuple(int(v) for v in row) for row in heads.tolist()]
        for layer, head in pairs:
            if not (0 <= layer < layers and 0 <= head < nheads):
                raise InvalidRequest(f"ph3 head ({layer}, {head}) is out of range for a model with {layers} "
                                     f"layers of {nheads} heads")
        if len(set(pairs)) != len(pairs):
            raise InvalidRequest("ph3 heads contain a duplicate (layer, head)")
        return heads.to(torch.int64).clone()

    def set_heads(self, heads: Iterable[tuple[int, int]] | torch.Tensor) -> None:
        """Prune exactly `heads` from now on (validated before anything changes)."""
        heads = self.validate_heads(heads_tensor(heads))
        self.remove_hooks()
        self.heads = heads
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads.tolist():
            by_layer.setdefault(layer, []).append(head)
        for layer, layer_heads in sorted(by_layer.items()):
            module = self.adapter.module(Site("attn.out", layer))
            in_features = self.adapter.linear_features(Site("attn.out", layer))[0]
            mask = head_mask(self.adapter, layer_heads, in_features).to(self.adapter.device(Site("attn.out", layer)))
            self.hook(module, self._make_hook(mask), pre=True, with_kwargs=True)

    @staticmethod
    def _make_hook(mask: torch.Tensor):
        def hook(module, args, kwargs):
            if args:
                return (args[0].masked_fill(mask, 0), *args[1:]), kwargs
            key = next(iter(kwargs))  # called with the input as a keyword
            return args, {**kwargs, key: kwargs[key].masked_fill(mask, 0)}
        return hook

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"heads": self.heads.clone()}, {"format": STATE_FORMAT, **self.meta}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise InvalidRequest(f"ph3 state has format {meta.get('format')}; this editkit reads {STATE_FORMAT}")
        if set(tensors) != {"heads"}:
            raise InvalidRequest(f"ph3 state must hold exactly one tensor 'heads', got {sorted(tensors)}")
        self.set_heads(tensors["heads"])
        self.meta = {k: v for k, v in meta.items() if k != "format"}


@contextmanager
def pruned(loaded: LoadedModel, heads: Iterable[tuple[int, int]] | torch.Tensor) -> Iterator[HeadPruning]:
    """Prune `heads` for the duration of the block (no session, nothing persisted)."""
    pruning = HeadPruning(loaded)
    pruning.attach()
    try:
        pruning.set_heads(heads)
        yield pruning
    finally:
        pruning.detach()
