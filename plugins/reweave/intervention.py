"""The reweaving intervention: capture hooks, per-conversation bounded buffers, and the gated
cross-attention that adds what the buffer holds back into a later layer's hidden states.

Concrete choices (the paper gives no equations; see docs/reweave.md):

* Capture: the output hidden state of each capture block, one entry per token, detached and
  copied. With `value_from="next_token"` (default) an entry is [the token's state | the next
  token's input embedding]: keys read the first half, values the second, so recall returns
  the token that followed a context like the current one (the induction-head pattern; 'next'
  stores the next token's state instead, 'token' the token's own embedding; with values from
  the token's own state the default model's training loss stayed at chance). With
  `key_window` > 1 the states of the tokens before it are kept too and keys read them all.
  Per forward pass and
  layer the `keep_per_chunk` highest-scored tokens are kept; the score is the z-score of the
  token's L2 norm within the chunk ('norm') or a linear probe on the layer-normed state
  ('learned'). A layer's buffer holds at most `capacity` entries; beyond that the
  lowest-scored ('score') or the oldest ('fifo') goes. Pad positions are never kept.
* Captures of one forward pass are staged and committed when the whole model's forward ends,
  so a chunk never reads its own (future) tokens: the memory a pass reads is from earlier passes.
* Reweave: after block `reweave_layer`, with x the output of block `query_layer` (default
  65% of depth; h itself when None),
  h <- h + tanh(g) * rms(h) * W_o MHA(q = W_q LN(x), k = W_k (LN(m_key) + e_layer),
  v = W_v (LN(m_value) + e_layer)), plus a learned null key with value 0 (a query may take
  nothing). Logits are scaled by a learned factor starting at `attention_scale` (4: a sharp
  start) and W_k starts equal to W_q, so attention starts by similarity. rms(h) makes the
  update relative to the residual stream's scale, which differs by orders of magnitude between
  models and depths. W_o starts at zero, so the contribution is exactly 0 until trained
  (g starts at 0.1, not 0, or neither could learn); with an empty buffer the hook returns the
  block output untouched.
* Memory belongs to a conversation: reads and writes happen only while a conversation is
  selected (`conversation(id)` / `set_conversation(id)`, thread-local); with none selected the
  model behaves exactly as without the plugin. Buffers are runtime memory, not saved state; the
  saved state is the reweaver's parameters.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from editkit.components import Intervention
from editkit.errors import InvalidRequest, WorkspaceError
from editkit.sites import Site

from .config import ReweaveConfig

STATE_FORMAT = 1
# Settings of how the trained reweaver serves, not of what it learnt: `intervention add
# reweave --from FILE --config KEY=VALUE` may change these and nothing else.
SERVING_SETTINGS = {"chunk_tokens", "max_conversations", "capacity", "eviction"}


class Reweaver(nn.Module):
    """Gated cross-attention from hidden states onto buffered latent states (identity at init)."""

    def __init__(self, hidden: int, sources: int, heads: int, head_dim: int, gate_init: float,
                 learned_scorer: bool, paired: bool = True, attention_scale: float = 1.0, key_window: int = 1):
        super().__init__()
        inner = heads * head_dim
        self.hidden, self.paired, self.key_window = hidden, paired, key_window
        self.heads, self.head_dim = heads, head_dim
        self.norm_q = nn.LayerNorm(hidden)
        self.norm_m = nn.LayerNorm(hidden)
        self.source = nn.Parameter(torch.zeros(sources, hidden))  # layer tag of each buffered state
        self.q = nn.Linear(hidden, inner, bias=False)
        self.k = nn.Linear(hidden * key_window, inner, bias=False)  # [own | previous | ...] states
        self.v = nn.Linear(hidden, inner, bias=False)
        self.o = nn.Linear(inner, hidden, bias=False)
        with torch.no_grad():  # keys start as the query projection: attention starts by similarity
            self.k.weight.zero_()  # earlier tokens of the window start without a say
            self.k.weight[:, :hidden].copy_(self.q.weight)
        nn.init.zeros_(self.o.weight)  # exactly the identity until trained
        self.null_key = nn.Parameter(torch.zeros(heads, head_dim))
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.log_scale = nn.Parameter(torch.tensor(float(attention_scale)).log())  # attention sharpness
        self.scorer = nn.Linear(hidden, 1) if learned_scorer else None
        if self.scorer is not None:
            nn.init.zeros_(self.scorer.weight)
            nn.init.zeros_(self.scorer.bias)

    def score(self, states: torch.Tensor) -> torch.Tensor:
        """Learned relevance of stored states (..., H or 2H: the key half is scored) -> (...)."""
        return self.scorer(self.norm_m(states[..., :self.hidden].float())).squeeze(-1)

    def project(self, memory: torch.Tensor, sources: torch.Tensor):
        """Keys, values and score bias of buffered states: memory (..., M, H; or 2H when paired:
        [the token's state | the next token's state]) and layer tags (..., M) -> k, v
        (..., heads, M, head_dim) and bias (..., M), float32. They depend only on the states and
        the reweaver's weights, so serving computes each once (see LayerBuffer.proj)."""
        lead, m = memory.shape[:-2], memory.shape[-2]
        nh, hd = self.heads, self.head_dim
        tag = self.source[sources]
        width = self.hidden * self.key_window
        window = memory[..., :width].float().unflatten(-1, (self.key_window, self.hidden))
        present = (window != 0).any(-1, keepdim=True)  # a window reaching before its pass holds zeros
        keys = ((self.norm_m(window) + tag.unsqueeze(-2)) * present).flatten(-2)
        own = memory[..., :self.hidden].float()
        values = memory[..., width:].float() if self.paired else own
        k = self.k(keys).view(*lead, m, nh, hd).transpose(-2, -3)
        v = self.v(self.norm_m(values) + tag).view(*lead, m, nh, hd).transpose(-2, -3)
        bias = self.score(memory) if self.scorer is not None else own.new_zeros((*lead, m))
        return k, v, bias

    def attend(self, hidden: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
               mask: torch.Tensor | None = None, query: torch.Tensor | None = None, attention: list | None = None
               ) -> torch.Tensor:
        """What reweaving adds to `hidden` (B, T, H) given projected memory (B or 1, heads, M,
        head_dim), its bias (B or 1, M) and a validity mask (B, M); float32, shaped as hidden.
        `query` (B, T, H): the states the queries come from (default: hidden). `attention`: a
        list that receives the attention weights (B, heads, T, 1 + M; slot 0 the null key)."""
        b, t, _ = hidden.shape
        nh, hd = self.heads, self.head_dim
        m = k.shape[-2]
        source = hidden if query is None else query
        q = self.q(self.norm_q(source.float())).view(b, t, nh, hd).transpose(1, 2)  # B nh T hd
        k = torch.cat([self.null_key.view(1, nh, 1, hd).expand(b, nh, 1, hd), k.expand(b, nh, m, hd)], dim=2)
        v = torch.cat([v.new_zeros(b, nh, 1, hd), v.expand(b, nh, m, hd)], dim=2)
        logits = q @ k.transpose(-1, -2) * (self.log_scale.exp() / hd ** 0.5)  # B nh T (1+M)
        full = logits.new_zeros(b, 1 + m)
        full[:, 1:] = bias
        if mask is not None:
            full[:, 1:] = full[:, 1:].masked_fill(~mask, float("-inf"))
        logits = logits + full[:, None, None, :]
        probs = torch.softmax(logits, dim=-1)
        if attention is not None:
            attention.append(probs)
        out = probs @ v  # B nh T hd
        out = out.transpose(1, 2).reshape(b, t, nh * hd)
        scale = hidden.float().pow(2).mean(-1, keepdim=True).sqrt()  # relative to the residual's size
        return torch.tanh(self.gate) * scale * self.o(out)

    def delta(self, hidden: torch.Tensor, memory: torch.Tensor, sources: torch.Tensor,
              mask: torch.Tensor | None = None, query: torch.Tensor | None = None,
              attention: list | None = None) -> torch.Tensor:
        """What reweaving adds to `hidden` (B, T, H), given memory (B, M, H or 2H), its layer
        tags (B, M), a validity mask (B, M) and the query states (default: hidden); float32,
        same shape as hidden (`attention`: see attend)."""
        return self.attend(hidden, *self.project(memory, sources), mask, query, attention)

    def forward(self, hidden, memory, sources, mask=None, query=None, attention=None):
        return hidden + self.delta(hidden, memory, sources, mask, query, attention).to(hidden.dtype)


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Projections (k, v, bias) of consecutive runs of states, as one: rows are dim 1 of k and
    v, dim 0 of bias."""
    return (torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1),
            torch.cat([p[2] for p in parts]))


@dataclass
class LayerBuffer:
    """Captured states of one layer in one conversation (all detached)."""

    states: torch.Tensor | None = None  # (n, H)
    scores: torch.Tensor | None = None  # (n,)
    order: torch.Tensor | None = None  # (n,) insertion counter, for fifo
    added: int = 0  # states ever added to this layer
    # The reweaver's k, v (heads, n, head_dim) and bias (n,) of these states, and the weights'
    # versions they were computed with: kept in step with the rows, so a decoding step
    # projects only the states it adds.
    proj: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    proj_weights: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return 0 if self.states is None else self.states.shape[0]


@dataclass
class MemoryBuffer:
    """One conversation's memory: a bounded buffer per capture layer."""

    layers: dict[int, LayerBuffer] = field(default_factory=dict)
    chunks: int = 0  # forward passes committed

    def __len__(self) -> int:
        return sum(len(b) for b in self.layers.values())

    def nbytes(self) -> int:
        total = 0
        for buf in self.layers.values():
            for t in (buf.states, buf.scores, buf.order, *(buf.proj or ())):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def add(self, layer: int, states: torch.Tensor, scores: torch.Tensor, capacity: int, eviction: str,
            project=None, weights: tuple[int, ...] | None = None) -> None:
        """Append states (evicting beyond capacity). `project(states)` gives their projections
        under `weights`; cached projections made under other weights are dropped."""
        buf = self.layers.setdefault(layer, LayerBuffer())
        order = torch.arange(buf.added, buf.added + states.shape[0], device=states.device)
        buf.added += states.shape[0]
        if buf.proj is not None and (project is None or buf.proj_weights != weights):
            buf.proj = buf.proj_weights = None
        if buf.states is None:
            buf.states, buf.scores, buf.order = states, scores, order
            if project is not None:
                buf.proj, buf.proj_weights = project(states), weights
        else:
            buf.states = torch.cat([buf.states, states])
            buf.scores = torch.cat([buf.scores, scores])
            buf.order = torch.cat([buf.order, order])
            if buf.proj is not None:
                buf.proj = _joined([buf.proj, project(states)])
        if len(buf) > capacity:
            key = buf.scores if eviction == "score" else buf.order.to(buf.scores.dtype)
            keep = torch.topk(key, capacity).indices.sort().values
            buf.states, buf.scores, buf.order = buf.states[keep], buf.scores[keep], buf.order[keep]
            if buf.proj is not None:
                buf.proj = (buf.proj[0][:, keep], buf.proj[1][:, keep], buf.proj[2][keep])  # rows: dim 1, 1, 0

    def memory(self, layer_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(states (M, H), source index (M,)) over all layers, or None when empty."""
        states, sources = [], []
        for i, layer in enumerate(layer_ids):
            buf = self.layers.get(layer)
            if buf is not None and len(buf):
                states.append(buf.states)
                sources.append(torch.full((len(buf),), i, dtype=torch.long, device=buf.states.device))
        if not states:
            return None
        return torch.cat(states), torch.cat(sources)

    def projections(self, layer_ids: list[int], project, weights: tuple[int, ...]):
        """(k, v, bias) of every buffered state, in memory()'s order, under `weights`;
        `project(states, source)` fills in what is not cached. None when empty."""
        parts = []
        for i, layer in enumerate(layer_ids):
            buf = self.layers.get(layer)
            if buf is None or not len(buf):
                continue
            if buf.proj is None or buf.proj_weights != weights:
                buf.proj, buf.proj_weights = project(buf.states, i), weights
            parts.append(buf.proj)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else _joined(parts)


def _window(hidden: torch.Tensor, valid: torch.Tensor | None, window: int) -> torch.Tensor:
    """Each position's state followed by the `window` - 1 states before it in the same pass
    (zeros before the pass or at pad positions): (B, T, H) -> (B*T, window*H)."""
    if valid is not None:
        hidden = hidden * valid[..., None].to(hidden.dtype)
    shifted = [torch.nn.functional.pad(hidden, (0, 0, j, 0))[:, :hidden.shape[1]] for j in range(window)]
    return torch.cat(shifted, dim=-1).reshape(-1, window * hidden.shape[-1])


def _hidden_of(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class MemoryReweaving(Intervention):
    """Captures hidden states into a bounded per-conversation buffer and reweaves them into a
    later layer with a zero-initialised gated cross-attention (trained; base model frozen)."""

    name = "reweave"
    Config = ReweaveConfig
    description = ("contextual memory reweaving: capture hidden states of earlier chunks in a bounded "
                   "per-conversation buffer and add them back at a later layer with a trained gated "
                   "cross-attention (`editkit reweave train`)")
    export_refusal = ("reweave keeps per-conversation memory at inference and a trained cross-attention "
                      "module that the model's architecture has no place for in a checkpoint")

    # ---- lifecycle ---------------------------------------------------------------------
    def attach(self) -> None:
        cfg: ReweaveConfig = self.config
        adapter = self.adapter
        self.capture_ids = sorted({adapter.layer_index(layer) for layer in cfg.capture_layers})
        self.reweave_id = adapter.layer_index(cfg.reweave_layer)
        self.query_id = self.reweave_id if cfg.query_layer is None else adapter.layer_index(cfg.query_layer)
        if self.query_id > self.reweave_id:
            raise InvalidRequest(f"reweave query_layer ({self.query_id}) lies above reweave_layer ({self.reweave_id})")
        if cfg.keep_per_chunk > cfg.capacity:
            raise InvalidRequest(f"reweave keep_per_chunk ({cfg.keep_per_chunk}) exceeds capacity ({cfg.capacity})")
        reweave_block = adapter.module(Site("block", self.reweave_id))
        device = adapter.device(Site("block", self.reweave_id))  # right under a device map, offloaded or not
        self.device = device
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            module = Reweaver(adapter.hidden_size, len(self.capture_ids), cfg.heads, cfg.head_dim,
                              cfg.gate_init, cfg.scorer == "learned", cfg.value_from != "self", cfg.attention_scale,
                              cfg.key_window)
        self.module = module.to(device)
        self.module.requires_grad_(False)
        self.cache_projections = True  # False: project every buffered state at every step (tests)
        self.meta: dict[str, Any] = {}
        self.buffers: OrderedDict[str, MemoryBuffer] = OrderedDict()
        self._local = threading.local()  # per thread: conversation, staged captures, pad mask
        self.hook(self.model, self._on_model_start, pre=True, with_kwargs=True)
        self.hook(self.model, self._on_model_end, with_kwargs=True)
        if self.query_id != self.reweave_id:
            self.hook(adapter.module(Site("block", self.query_id)), self._on_query_block)
        if self.values_are_embeddings:
            self.hook(adapter.module(Site("embed")), self._on_embed)
        for layer in self.capture_ids:
            self.hook(adapter.module(Site("block", layer)), self._make_capture(layer))
        self.hook(reweave_block, self._reweave_hook)
        self.attached = True

    def detach(self) -> None:
        super().detach()
        self.buffers.clear()
        self._local = threading.local()

    # ---- conversations -----------------------------------------------------------------
    @property
    def _pending(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        if not hasattr(self._local, "pending"):
            self._local.pending = {}
        return self._local.pending

    @_pending.setter
    def _pending(self, value) -> None:
        self._local.pending = value

    @property
    def _pad_mask(self) -> torch.Tensor | None:
        return getattr(self._local, "pad_mask", None)

    @_pad_mask.setter
    def _pad_mask(self, value) -> None:
        self._local.pad_mask = value

    @property
    def current(self) -> str | None:
        """The conversation this thread reads and writes, or None (the plugin is then inert)."""
        return getattr(self._local, "conversation", None)

    def set_conversation(self, conversation: str | None) -> None:
        """Select which conversation's buffer the following forward passes read and write
        (None: none; the model then behaves exactly as without the plugin)."""
        self._local.conversation = None if conversation is None else str(conversation)
        self._pending = {}

    @contextmanager
    def conversation(self, conversation: str) -> Iterator[MemoryBuffer]:
        """Read and write `conversation`'s memory for the duration of the block."""
        previous = self.current
        self.set_conversation(conversation)
        try:
            yield self.buffer(conversation)
        finally:
            self.set_conversation(previous)

    def buffer(self, conversation: str | None = None) -> MemoryBuffer:
        """The buffer of `conversation` (default: the current one), created when missing."""
        key = str(conversation if conversation is not None else self.current)
        if key == "None":
            raise InvalidRequest("no conversation selected")
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = MemoryBuffer()
            while len(self.buffers) > self.config.max_conversations:
                self.buffers.popitem(last=False)
        self.buffers.move_to_end(key)
        return buf

    def clear_conversation(self, conversation: str) -> None:
        self.clear(conversation)

    def chunk_tokens(self) -> int | None:
        return self.config.chunk_tokens or None

    def clear(self, conversation: str | None = None) -> None:
        """Forget everything `conversation` (default: the current one) remembers."""
        key = str(conversation if conversation is not None else self.current)
        self.buffers.pop(key, None)
        self._pending = {}

    # ---- hooks -------------------------------------------------------------------------
    def _on_model_start(self, module, args, kwargs):
        self._pending = {}
        self._local.embedded = self._local.query = None
        mask = kwargs.get("attention_mask")
        self._pad_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _on_model_end(self, module, args, kwargs, output):
        if self.current is not None and self._pending:
            buf = self.buffer()
            weights = self._weights_version()
            for layer, (states, scores) in self._pending.items():
                project = None
                if weights is not None:
                    source = self.capture_ids.index(layer)
                    project = lambda s, source=source: self._project(s, source)  # noqa: E731
                buf.add(layer, states, scores, self.config.capacity, self.config.eviction, project, weights)
            buf.chunks += 1
        self._pending = {}

    def _weights_version(self) -> tuple[int, ...] | None:
        """What identifies the reweaver's current weights (in-place optimiser steps and
        load_state_dict bump a tensor's version), or None while it trains: projections are
        cached only for frozen weights."""
        if not self.cache_projections or any(p.requires_grad for p in self.module.parameters()):
            return None
        return tuple(p._version for p in self.module.parameters()) + (id(self.module),)

    @torch.no_grad()
    def _project(self, states: torch.Tensor, source: int):
        sources = torch.full((states.shape[0],), source, dtype=torch.long, device=states.device)
        return self.module.project(states, sources)

    @property
    def values_are_embeddings(self) -> bool:
        """Whether stored values are input embeddings (captured from the embedding layer)."""
        return self.config.value_from in ("next_token", "token")

    def _on_query_block(self, module, args, output):
        if self.current is not None:
            self._local.query = _hidden_of(output).detach()
        return None

    def _on_embed(self, module, args, output):
        if self.current is not None:
            self._local.embedded = _hidden_of(output).detach()
        return None

    def select(self, hidden: torch.Tensor, valid: torch.Tensor | None = None,
               embedded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """From one layer's hidden states (B, T, H), the (states (k, H or 2H), scores (k,)) to
        keep: the `keep_per_chunk` best-scored non-pad tokens, detached copies. `embedded`:
        the pass's input embeddings (B, T, H), needed with value_from 'next_token'."""
        with torch.no_grad():
            hidden = hidden.detach()
            if self.values_are_embeddings:
                if embedded is None or embedded.shape[:2] != hidden.shape[:2]:
                    raise RuntimeError(f"reweave: value_from '{self.config.value_from}' needs the pass's input embeddings")
                following = embedded.detach().to(hidden.device, hidden.dtype)
            else:
                following = hidden
            if valid is not None and valid.shape != hidden.shape[:2]:
                valid = None
            valid = None if valid is None else valid.to(device=hidden.device, dtype=torch.bool)
            own = hidden.reshape(-1, hidden.shape[-1])
            keep = torch.ones(own.shape[0], dtype=torch.bool, device=own.device) if valid is None \
                else valid.reshape(-1)
            flat = own
            if self.config.value_from == "token":  # [own state | own input embedding]
                flat = torch.cat([own, following.reshape(-1, hidden.shape[-1])], dim=-1)
            elif self.config.value_from != "self":  # [own state | what the next token holds (own at the end)]
                nxt = torch.cat([following[:, 1:], following[:, -1:]], dim=1)
                has_next = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
                has_next[:, -1] = False
                if valid is not None:
                    has_next &= torch.cat([valid[:, 1:], valid[:, -1:] & False], dim=1)
                nxt = torch.where(has_next[..., None], nxt, following)
                flat = torch.cat([own, nxt.reshape(-1, hidden.shape[-1])], dim=-1)
            if self.config.key_window > 1:  # [own | previous | ... | value]: keys read the window
                flat = torch.cat([_window(hidden, valid, self.config.key_window), flat[:, hidden.shape[-1]:]], dim=-1)
            if self.config.scorer == "learned":
                scores = self.module.score(flat)
            else:
                norms = hidden.reshape(-1, hidden.shape[-1]).float().norm(dim=-1)
                sel = norms[keep]
                std = sel.std() if sel.numel() > 1 else sel.new_ones(())
                scores = (norms - sel.mean()) / (std + 1e-6)
            scores = scores.masked_fill(~keep, float("-inf"))
            k = min(self.config.keep_per_chunk, int(keep.sum()))
            idx = torch.topk(scores, k).indices.sort().values
            return flat[idx].to(self.device, copy=True), scores[idx].float().to(self.device, copy=True)

    def _make_capture(self, layer: int):
        def hook(module, args, output):
            if self.current is None:
                return None
            hidden = _hidden_of(output)
            valid = self._pad_mask
            if valid is not None and valid.shape[:2] != hidden.shape[:2]:
                valid = valid[:, -hidden.shape[1]:] if valid.shape[0] == hidden.shape[0] else None
            embedded = getattr(self._local, "embedded", None)
            self._pending[layer] = self.select(hidden, valid, embedded)
            return None
        return hook

    def _reweave_hook(self, module, args, output):
        if self.current is None:
            return None
        buf = self.buffers.get(self.current)
        if buf is None or not len(buf):
            return None  # empty memory: the block output is returned untouched
        hidden = _hidden_of(output)
        weights = self._weights_version()
        if weights is None:  # training: project through the graph
            states, sources = buf.memory(self.capture_ids)
            k, v, bias = self.module.project(states, sources)
        else:
            k, v, bias = buf.projections(self.capture_ids, self._project, weights)
        query = getattr(self._local, "query", None) if self.query_id != self.reweave_id else None
        if query is not None:
            query = query.to(hidden.device)
        delta = self.module.attend(hidden, k[None], v[None], bias[None], query=query)
        return _with_hidden(output, hidden + delta.to(hidden.dtype))

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return tensors, {"format": STATE_FORMAT, "capture_layers": self.capture_ids,
                         "reweave_layer": self.reweave_id, **self.meta}

    @classmethod
    def state_from_file(cls, path, options, loaded):
        """From a file of `editkit reweave train --out`: its config and trained weights."""
        from .files import load_file

        fixed = sorted(set(options) - SERVING_SETTINGS)
        if fixed:
            raise InvalidRequest(f"reweave takes {', '.join(fixed)} from the trained file; --config may set only "
                                 f"{', '.join(sorted(SERVING_SETTINGS))}")
        tensors, doc = load_file(path)
        if doc.get("fingerprint") and loaded.fingerprint != doc["fingerprint"]:
            raise WorkspaceError(f"{path} was trained on other weights (fingerprint {doc['fingerprint']}, "
                                 f"workspace model {loaded.fingerprint})")
        config = doc.get("config")
        return (None if config is None and not options else {**(config or {}), **options}), tensors, doc.get("state", {})

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise InvalidRequest(f"reweave state has format {meta.get('format')}; this editkit reads {STATE_FORMAT}")
        own = self.module.state_dict()
        if set(tensors) != set(own):
            raise InvalidRequest(f"reweave state tensors {sorted(tensors)} do not match the config's "
                                 f"{sorted(own)}")
        for key, value in own.items():
            if tuple(tensors[key].shape) != tuple(value.shape):
                raise InvalidRequest(f"reweave state tensor '{key}' has shape {tuple(tensors[key].shape)}, "
                                     f"expected {tuple(value.shape)} (other model or config?)")
        self.module.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in tensors.items()})
        self.meta = {k: v for k, v in meta.items() if k not in ("format", "capture_layers", "reweave_layer")}

    def memory_bytes(self) -> int:
        return sum(b.nbytes() for b in self.buffers.values())


@contextmanager
def reweaving(loaded, config: ReweaveConfig | dict | None = None,
              state: tuple[dict, dict] | None = None) -> Iterator[MemoryReweaving]:
    """Reweave for the duration of the block (no session, nothing persisted)."""
    rw = MemoryReweaving(loaded, config)
    rw.attach()
    try:
        if state is not None:
            rw.load_state_dict(*state)
        yield rw
    finally:
        rw.detach()
