"""Locating memory heads and context heads by path patching.

Sign convention. For an item, the logit difference is

    LD = logit(first token of the memorised answer) - logit(first token of the context's answer)

at the last position of the conflict prompt. A head's score is the effect on LD of that head's
output in the conflict run *versus* the reference run (which states the true answer instead):

    score(l, h) = LD(conflict run) - LD(conflict run with head (l, h)'s output taken from the reference run)

averaged over items. score > 0: in the conflict the head pushes towards the memorised answer
(a memory head); score < 0: it pushes towards the context's answer (a context head).

Direct-path mode (default): only the path head output -> output projection slice -> final norm
-> unembedding counts, with the final norm linearised at the conflict run (its scale, and
centering for LayerNorm, taken from the conflict run's final-norm input). Then

    score(l, h) = g . W_O[:, slice(h)] (z_conflict(l, h) - z_reference(l, h)),
    g = P (w_norm * (W_U[memory] - W_U[context])) / s_conflict

so one cached forward pass per prompt (the output projection's input at every layer,
captured with hooks) serves every head. Activation-patching mode (called "full path
patching" before: it patches the head's output through every downstream path, which is
activation patching) patches the head's slice of the output projection's input from the
reference run into the conflict run, over the repeated prompt's positions (the two prompts
agree there, aligned from the end), and measures LD: one forward pass per head (items batched).

Which heads to prune (pruning order). The path-patching score above says which heads behave
differently when the context contradicts memory; it is the documented classification, but it
is not what pruning does. Pruning zeroes a head's output, so what matters is the head's own
contribution in the conflict run, and the patching score can mislead: on SmolLM2-135M the
strongest "context head" by patching (L23H4) writes the *memorised* answer on both runs, only
more so after the reference prompt stated it, and pruning it cut the memory rate by 32 points
and clean accuracy to 63%. So two more direct-path quantities come from the same cached
forwards (plus one forward of the clean prompts):

    ablation(l, h) = the head's direct contribution to LD in the conflict run
                   = the drop in LD when the head is zero-ablated (direct path)
    clean(l, h)    = its direct contribution to LD on the clean prompt (no context)

and the heads of a kind are pruned in the order of

    gain(l, h) = s * ablation(l, h) - max(0, clean(l, h)),   s = +1 memory heads, -1 context heads

keeping only heads whose patching score has the kind's sign and whose gain is > 0: removing
them moves LD the favoured way in the conflict run, by more than they help the clean prompt's
answer (the guardrail's proxy). That is order "effect" (the default, editkit's own); order
"paper" prunes by the patching score alone, as PH3 does. k is chosen by measuring on the
validation split either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from editkit.errors import InvalidRequest
from editkit.model import LoadedModel
from editkit.sites import Site

from .items import ConflictItem

SIGN_CONVENTION = ("score = LD(conflict) - LD(conflict with the head's output from the reference run), "
                   "LD = logit(memory answer) - logit(context answer), first answer token, last position; "
                   "> 0 memory head, < 0 context head")


# ---- batched forward passes ------------------------------------------------------------
def encode_left(tokenizer, prompts: list[str], device) -> dict[str, torch.Tensor]:
    """Left-padded batch (every row's last token at the last position) with explicit position
    ids, so a padded row runs as it would alone."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    mask = enc.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": enc.input_ids.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device)}


@torch.no_grad()
def last_logits(loaded: LoadedModel, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """(N, vocab) next-token logits after each prompt (float32, on CPU)."""
    rows = []
    for start in range(0, len(prompts), batch_size):
        enc = encode_left(loaded.tokenizer, prompts[start:start + batch_size], loaded.device)
        rows.append(loaded.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu())
    return torch.cat(rows) if rows else torch.zeros(0)


def logit_diff(logits: torch.Tensor, items: list[ConflictItem]) -> torch.Tensor:
    mem = torch.tensor([it.memory_token for it in items])
    ctx = torch.tensor([it.context_token for it in items])
    rows = torch.arange(len(items))
    return logits[rows, mem] - logits[rows, ctx]


# ---- the final norm, linearised ------------------------------------------------------
def _norm_parts(adapter) -> tuple[torch.Tensor, torch.Tensor | None, float, bool]:
    """(weight, bias, eps, centers) of the final norm in float32, from the adapter."""
    weight, bias, eps, centers = adapter.final_norm_parts()
    return weight.detach().float(), (None if bias is None else bias.detach().float()), eps, centers


def norm_scale(adapter, x: torch.Tensor) -> torch.Tensor:
    """Per-row scale s with norm(x) = w * P x / s + b (P: centering for LayerNorm), (N, 1);
    checked against the module itself so an unfamiliar norm fails loudly instead of silently."""
    norm = adapter.module(Site("final_norm"))
    weight, bias, eps, centers = _norm_parts(adapter)
    x = x.float()
    xc = x - x.mean(-1, keepdim=True) if centers else x
    scale = torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    rebuilt = weight.to(x.device) * xc / scale + (0 if bias is None else bias.to(x.device))
    with torch.no_grad():
        actual = norm(x.to(weight.dtype).to(adapter.device(Site("final_norm")))).float().to(x.device)
    if not torch.allclose(rebuilt, actual, rtol=1e-3, atol=1e-4 * (1 + actual.abs().max().item())):
        raise InvalidRequest(f"ph3 cannot linearise the final norm {type(norm).__name__}: it is neither "
                             "LayerNorm nor RMSNorm as written w * x / rms(x)")
    return scale


# ---- capturing -------------------------------------------------------------------------
@dataclass
class Capture:
    """What one forward pass over a batch of prompts leaves behind, at the last `positions`
    positions: every layer's output-projection input, and the final norm's input."""

    z: torch.Tensor  # (N, L, positions, D_in)
    final: torch.Tensor  # (N, hidden) final-norm input at the last position
    logits: torch.Tensor  # (N, vocab) at the last position


@torch.no_grad()
def capture(loaded: LoadedModel, prompts: list[str], positions: int = 1, batch_size: int = 16) -> Capture:
    adapter = loaded.adapter
    layers = range(adapter.num_layers)
    zs, finals, logits = [], [], []
    points = {layer: (Site("attn.out", layer), "in") for layer in layers}
    points["final"] = (Site("final_norm"), "in")
    for start in range(0, len(prompts), batch_size):
        enc = encode_left(loaded.tokenizer, prompts[start:start + batch_size], loaded.device)
        got, output = adapter.capture({**enc, "use_cache": False, "logits_to_keep": 1}, points, stop=False)
        zs.append(torch.stack([got[layer][:, -positions:].float().cpu() for layer in layers], dim=1))
        finals.append(got["final"][:, -1].float().cpu())
        logits.append(output.logits[:, -1].float().cpu())
    return Capture(torch.cat(zs), torch.cat(finals), torch.cat(logits))


# ---- scores ----------------------------------------------------------------------------
MODES = ("direct", "activation")
ORDERS = ("effect", "paper")


@dataclass
class HeadScores:
    """Mean score per (layer, head) and how it was measured."""

    scores: torch.Tensor  # (L, H) float32
    mode: str  # "direct" (direct path patching) or "activation" (activation patching)
    n_items: int
    per_item: torch.Tensor | None = field(default=None, repr=False)  # (N, L, H)
    logit_diff_conflict: float | None = None
    logit_diff_reference: float | None = None
    # direct-path quantities behind the pruning order (module doc); None: order by `scores`
    ablation: torch.Tensor | None = None  # (L, H) contribution to LD in the conflict run
    clean: torch.Tensor | None = None  # (L, H) contribution to LD on the clean prompt
    order: str = "effect"  # pruning order: "effect" (by gain) or "paper" (by patching score)

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in ("memory", "context"):
            raise InvalidRequest(f"head kind must be 'memory' or 'context', not '{kind}'")

    def ranked(self, kind: str) -> list[tuple[int, int, float]]:
        """By the path-patching score: 'memory': positive scores, strongest first; 'context':
        negative, most negative first."""
        self._check_kind(kind)
        flat = self.scores.flatten()
        order = torch.argsort(flat, descending=(kind == "memory")).tolist()
        heads = self.scores.shape[1]
        out = [(i // heads, i % heads, float(flat[i])) for i in order]
        return [h for h in out if (h[2] > 0 if kind == "memory" else h[2] < 0)]

    def gain(self, kind: str) -> torch.Tensor | None:
        """(L, H) expected benefit of pruning each head of `kind` (module doc), or None without
        the ablation / clean matrices."""
        self._check_kind(kind)
        if self.ablation is None or self.clean is None:
            return None
        sign = 1.0 if kind == "memory" else -1.0
        return sign * self.ablation - self.clean.clamp(min=0)

    def prune_ranked(self, kind: str) -> list[tuple[int, int, float]]:
        """The heads of `kind` to prune, best first. Order "effect": heads the patching score
        puts in `kind` whose gain is > 0, by gain (with the gain). Order "paper", or a heads file
        without ablation / clean matrices: `ranked(kind)`, by patching score."""
        gain = self.gain(kind)
        if gain is None or self.order == "paper":
            return self.ranked(kind)
        kept = {(layer, head) for layer, head, _ in self.ranked(kind)}
        flat = gain.flatten()
        heads = self.scores.shape[1]
        order = torch.argsort(flat, descending=True).tolist()
        return [(i // heads, i % heads, float(flat[i])) for i in order
                if float(flat[i]) > 0 and (i // heads, i % heads) in kept]

    def top(self, kind: str, k: int) -> list[tuple[int, int]]:
        """The first k heads of `kind` to prune (in pruning order)."""
        return [(layer, head) for layer, head, _ in self.prune_ranked(kind)[:k]]

    def to_dict(self) -> dict[str, Any]:
        rows = lambda m: None if m is None else [[round(float(v), 6) for v in row] for row in m]
        return {"mode": self.mode, "order": self.order, "n_items": self.n_items, "sign_convention": SIGN_CONVENTION,
                "logit_diff_conflict": self.logit_diff_conflict, "logit_diff_reference": self.logit_diff_reference,
                "scores": rows(self.scores), "ablation": rows(self.ablation), "clean": rows(self.clean),
                "memory_heads": [[l, h, round(s, 6)] for l, h, s in self.ranked("memory")],
                "context_heads": [[l, h, round(s, 6)] for l, h, s in self.ranked("context")],
                "pruning_order": {kind: [[l, h, round(g, 6)] for l, h, g in self.prune_ranked(kind)]
                                  for kind in ("memory", "context")}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadScores":
        def matrix(key: str, required: bool) -> torch.Tensor | None:
            if data.get(key) is None and not required:
                return None
            try:
                m = torch.tensor(data[key], dtype=torch.float32)
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidRequest(f"heads file has no valid '{key}' matrix ({exc})") from None
            if m.dim() != 2:
                raise InvalidRequest(f"heads file '{key}' must be a (layers, heads) matrix")
            return m

        scores = matrix("scores", True)
        ablation, clean = matrix("ablation", False), matrix("clean", False)
        for m in (ablation, clean):
            if m is not None and m.shape != scores.shape:
                raise InvalidRequest("heads file 'ablation' / 'clean' must have the shape of 'scores'")
        order = data.get("order", "effect")
        if order not in ORDERS:
            raise InvalidRequest(f"heads file order '{order}': one of {', '.join(ORDERS)}")
        mode = {"full": "activation"}.get(data.get("mode", "direct"), data.get("mode", "direct"))
        return cls(scores, mode, int(data.get("n_items", 0)),
                   logit_diff_conflict=data.get("logit_diff_conflict"),
                   logit_diff_reference=data.get("logit_diff_reference"), ablation=ablation, clean=clean,
                   order=order)


def unembed_direction(loaded: LoadedModel, items: list[ConflictItem]) -> torch.Tensor:
    """(N, hidden): W_U[memory token] - W_U[context token] per item."""
    w_u = loaded.adapter.weight_values(Site("unembed")).float()
    mem = torch.tensor([it.memory_token for it in items], device=w_u.device)
    ctx = torch.tensor([it.context_token for it in items], device=w_u.device)
    return (w_u[mem] - w_u[ctx]).cpu()


def direct_effects(loaded: LoadedModel, items: list[ConflictItem], z: torch.Tensor,
                   final_conflict: torch.Tensor) -> torch.Tensor:
    """(N, L, H): each head's direct contribution to LD for per-layer o_proj inputs `z`
    (N, L, D_in) at the last position, through the final norm linearised at `final_conflict`."""
    adapter = loaded.adapter
    weight, _, _, centers = _norm_parts(adapter)
    scale = norm_scale(adapter, final_conflict.to(weight.device)).cpu()  # (N, 1)
    g = weight.cpu() * unembed_direction(loaded, items)  # (N, hidden)
    if centers:
        g = g - g.mean(-1, keepdim=True)
    g = g / scale
    out = torch.zeros(len(items), adapter.num_layers, adapter.num_heads)
    for layer in range(adapter.num_layers):
        w_o = adapter.weight_values(Site("attn.out", layer)).float().cpu()  # (hidden, D_in)
        read = g @ w_o  # (N, D_in): what each input feature adds to LD
        contrib = read * z[:, layer]
        for head in range(adapter.num_heads):
            out[:, layer, head] = contrib[:, adapter.head_slice(head)].sum(-1)
    return out


def direct_scores(loaded: LoadedModel, items: list[ConflictItem], conflict: Capture,
                  reference: Capture) -> torch.Tensor:
    """(N, L, H) direct-path scores from cached captures of both runs (see module doc)."""
    return (direct_effects(loaded, items, conflict.z[:, :, -1], conflict.final)
            - direct_effects(loaded, items, reference.z[:, :, -1], conflict.final))


@torch.no_grad()
def full_scores(loaded: LoadedModel, items: list[ConflictItem], conflict: Capture, reference: Capture,
                batch_size: int = 32, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """(N, L, H) full path-patching scores: per head, one batched forward of the conflict
    prompts with that head's slice of the output projection's input replaced by the reference
    run's over the repeated prompt (the items' shared trailing tokens)."""
    adapter = loaded.adapter
    positions = conflict.z.shape[2]
    suffix = torch.tensor([min(it.suffix_tokens, positions) for it in items])
    # (N, positions): True where the position belongs to the shared suffix (aligned from the end)
    in_suffix = torch.arange(positions).flip(0)[None, :] < suffix[:, None]
    base = logit_diff(conflict.logits, items)
    prompts = [it.conflict_prompt for it in items]
    encs = [(start, encode_left(loaded.tokenizer, prompts[start:start + batch_size], loaded.device))
            for start in range(0, len(items), batch_size)]
    out = torch.zeros(len(items), adapter.num_layers, adapter.num_heads)
    total, done = adapter.num_layers * adapter.num_heads, 0
    for layer in range(adapter.num_layers):
        module = adapter.module(Site("attn.out", layer))
        for head in range(adapter.num_heads):
            sl = adapter.head_slice(head)
            for start, enc in encs:
                rows = slice(start, start + enc["input_ids"].shape[0])
                ref = reference.z[rows, layer, :, sl].to(loaded.device)
                keep = in_suffix[rows].to(loaded.device)[..., None]

                def patch(mod, args, kwargs, _ref=ref, _keep=keep, _sl=sl):
                    x = args[0].clone()
                    tail = x[:, -positions:, _sl]
                    x[:, -positions:, _sl] = torch.where(_keep, _ref.to(x.dtype), tail)
                    return (x, *args[1:]), kwargs

                handle = module.register_forward_pre_hook(patch, with_kwargs=True)
                try:
                    logits = loaded.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu()
                finally:
                    handle.remove()
                out[rows, layer, head] = base[rows] - logit_diff(logits, items[rows])
            done += 1
            if progress:
                progress(done, total)
    return out


def locate_heads(loaded: LoadedModel, items: list[ConflictItem], mode: str = "direct", order: str = "effect",
                 batch_size: int = 16, progress: Callable[[int, int], None] | None = None) -> HeadScores:
    """Score every (layer, head) on `items` (see the module doc for the sign convention) by
    direct path patching ("direct") or activation patching ("activation"); `order` is the
    pruning order the scores carry ("effect" or "paper")."""
    if not items:
        raise InvalidRequest("no conflict items to locate heads with")
    if mode not in MODES or order not in ORDERS:
        raise InvalidRequest(f"ph3 mode '{mode}' / order '{order}': modes {', '.join(MODES)}; "
                             f"orders {', '.join(ORDERS)}")
    full_patching = mode == "activation"
    positions = max(it.suffix_tokens for it in items) if full_patching else 1
    conflict = capture(loaded, [it.conflict_prompt for it in items], positions, batch_size)
    total = 3 + (loaded.adapter.num_layers * loaded.adapter.num_heads if full_patching else 0)
    if progress:
        progress(1, total)
    reference = capture(loaded, [it.reference_prompt for it in items], positions, batch_size)
    if progress:
        progress(2, total)
    clean = capture(loaded, [it.prompt for it in items], 1, batch_size)
    if progress:
        progress(3, total)
    # the pruning order's inputs (module doc): zero-ablation through the direct path, and the
    # clean prompt's answer-writing, each linearised at its own run's final norm
    ablation = direct_effects(loaded, items, conflict.z[:, :, -1], conflict.final).mean(0)
    clean_effect = direct_effects(loaded, items, clean.z[:, :, -1], clean.final).mean(0)
    if full_patching:
        step = (lambda done, _: progress(3 + done, total)) if progress else None
        per_item = full_scores(loaded, items, conflict, reference, batch_size * 2, step)
    else:
        per_item = direct_scores(loaded, items, conflict, reference)
    return HeadScores(per_item.mean(0), mode, len(items), per_item,
                      float(logit_diff(conflict.logits, items).mean()),
                      float(logit_diff(reference.logits, items).mean()), ablation, clean_effect, order)
