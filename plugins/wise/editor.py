"""WISE: a side copy of one MLP down-projection learns the edits; a router sends a sequence
through it when the side memory's output differs enough from the main memory's.

The main weights are never written: the side memory is held as a delta D (out, in) and a
forward hook on the down-projection returns main(x) + D x for routed rows (torch.where on a
per-row mask, no host synchronisation), main(x) itself for the rest, so detaching is exact.

Speed: the inputs of the edited layer do not change while one edit trains, so (fast_path) the
down-projection input and the block output are captured once per edit; each step adds D x to
the block output, runs only the blocks above (adapter.run_blocks) and projects to the
vocabulary only where the loss needs it. Context prefixes are generated once per session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from editkit.components import Editor
from editkit.errors import WorkspaceError
from editkit.forward import call_context
from editkit.schemas import EditRequest
from editkit.sites import Site
from editkit.tokens import IGNORE, encode_pair

from .config import WISEConfig
from editkit.unrelated import UNRELATED

STATE_FORMAT = 1
_SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass
class Rows:
    """Right-padded rows with target labels and the token span each row is scored on."""

    ids: torch.Tensor  # (B, T)
    attn: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), aligned with ids (not shifted)
    score: torch.Tensor  # (B, T) 1.0 where the activation score counts the token

    def to(self, device) -> "Rows":
        return Rows(self.ids.to(device), self.attn.to(device), self.labels.to(device), self.score.to(device))


def make_rows(tokenizer, specs: list[tuple[str, str | None, int | None]], pad_to: int | None = None,
              score_target: bool = True) -> Rows:
    """specs: (prompt, target or None, n) — the activation score counts the last n prompt
    tokens (None: all of them) and, with score_target, the target tokens; labels mark the
    target tokens."""
    rows, labels, scores = [], [], []
    for prompt, target, n in specs:
        if target is None:
            p, t = list(tokenizer(prompt).input_ids), []
        else:
            p, t = encode_pair(tokenizer, prompt, target)
        n = len(p) if n is None else min(n, len(p))
        rows.append(p + t)
        labels.append([IGNORE] * len(p) + t)
        scores.append([0.0] * (len(p) - n) + [1.0] * n + [1.0 if score_target else 0.0] * len(t))
    width = max(max(len(r) for r in rows), pad_to or 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    sc = torch.zeros((len(rows), width))
    for i, (r, l, s) in enumerate(zip(rows, labels, scores)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        lab[i, : len(l)] = torch.tensor(l)
        sc[i, : len(s)] = torch.tensor(s)
    return Rows(ids, attn, lab, sc)


def reduce_scores(token_norms: torch.Tensor, weight: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T) per-token distances and 0/1 weights -> (B,) sequence scores."""
    weight = weight.to(token_norms.dtype)
    if how == "max":
        return torch.where(weight > 0, token_norms, torch.zeros_like(token_norms)).amax(dim=1)
    return (token_norms * weight).sum(1) / weight.sum(1).clamp(min=1.0)


def target_lead(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, V) logits, (N,) targets -> the smallest lead, in nats of log-probability, of a target
    token over the best other token (negative where the target is not the greedy prediction)."""
    tgt = logits.gather(1, targets[:, None])[:, 0]
    other = logits.scatter(1, targets[:, None], float("-inf")).amax(dim=1)
    return (tgt - other).min()


def ties_merge(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023) of task vectors: trim each to its largest `density`
    fraction, elect a sign per entry, average the entries that agree with it."""
    trimmed = []
    for d in deltas:
        flat = d.abs().flatten()
        k = max(1, int(round(density * flat.numel())))
        cut = flat.kthvalue(flat.numel() - k + 1).values if k < flat.numel() else flat.new_tensor(0.0)
        trimmed.append(torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


class WISEEditor(Editor):
    name = "wise"
    Config = WISEConfig
    description = "WISE: routed side memory of one MLP down-projection with knowledge sharding"

    # ---- attach / detach ---------------------------------------------------------------
    def attach(self) -> None:
        cfg = self.config
        self.layer = self.adapter.layer_index(cfg.layer)
        self.site = Site("mlp.down", self.layer)
        self.down = self.adapter.module(self.site)
        weight = self.adapter.weight(self.site)
        self.shape = tuple(weight.shape)  # (out, in)
        self.device = weight.device
        self._reset()
        self.hook(self.down, self._down_hook)
        self.hook(self.model, self._model_pre_hook, pre=True, with_kwargs=True)
        self.attached = True

    def _reset(self) -> None:
        out_f, in_f = self.shape
        z = dict(dtype=torch.float32, device=self.device)
        self.memories = torch.zeros((1, out_f, in_f), **z)  # side minus main, one per memory
        self.thresholds = torch.full((1,), float("inf"), **z)
        self.keys = torch.zeros((1, in_f), **z)  # retrieve: mean normalised input of each memory's edits
        self.mask: torch.Tensor | None = None  # current shard's gradient mask
        self.shard_base = torch.zeros((out_f, in_f), **z)  # merge: side memory when the shard began
        self.merge_base = torch.zeros((out_f, in_f), **z)  # merge: side memory after the last merge
        self.pending: list[torch.Tensor] = []  # merge: finished shards' changes awaiting a merge
        self.edits: list[dict[str, Any]] = []  # {prompt, target, memory}
        self.shard_edits = 0
        self.shards = 0
        self.unit: float | None = None
        self.basis: torch.Tensor | None = None  # (in, k): unrelated activations' principal directions
        self.contexts: list[str] | None = None
        self._xcache: dict[int, tuple[torch.Tensor, int, int]] = {}
        self._bypass = False
        self._train_delta: torch.Tensor | None = None
        self._train_x: torch.Tensor | None = None
        self._call: tuple[Any, int] = (None, 0)
        self._route: tuple[torch.Tensor, torch.Tensor] | None = None
        self._index = None

    # ---- inference: hooks and routing ----------------------------------------------------
    def _model_pre_hook(self, module, args, kwargs):
        self._call = call_context(args, kwargs)

    def _down_hook(self, module, inputs, output):
        if self._bypass:
            return None
        x = inputs[0]
        if self._train_delta is not None:  # slow training path: every row through the side memory
            xp = self._project(x.to(torch.float32))
            self._train_x = xp
            return output + F.linear(xp, self._train_delta).to(output.dtype)
        if not self.edits:
            return None
        route, delta_out = self._route_rows(x)
        return torch.where(route[:, None, None], output + delta_out.to(output.dtype), output)

    def _route_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row routing decision (B,) and the side-minus-main output (B, T, out).

        The decision is made when a sequence starts (no KV cache yet) from its valid tokens and
        kept for the tokens generated after it, so a batch and its rows alone agree."""
        mask, past = self._call
        b, t = x.shape[:2]
        xf = self._project(x.to(torch.float32))
        fresh = past == 0 or self._route is None or self._route[0].shape[0] != b
        if fresh:
            if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == b:
                valid = mask[:, -t:].to(torch.float32)
            else:
                valid = torch.ones((b, t), device=x.device)
            route, idx, delta_out = self._decide(xf, valid)
            self._route = (route, idx)
            return route, delta_out
        route, idx = self._route
        if self.memories.shape[0] == 1:
            return route, F.linear(xf, self.memories[0])
        return route, torch.einsum("bti,bhi->bth", xf, self.memories[idx])

    def _decide(self, xf: torch.Tensor, valid: torch.Tensor):
        how = self.config.score_reduce
        g = self.memories.shape[0]
        b = xf.shape[0]
        rows = torch.arange(b, device=xf.device)
        if g == 1:
            d = F.linear(xf, self.memories[0])
            score = reduce_scores(d.norm(dim=-1), valid, how)
            idx = torch.zeros(b, dtype=torch.long, device=xf.device)
            return score > self.thresholds[0], idx, d
        if g < self.config.faiss_min_memories:
            d_all = torch.einsum("bti,ghi->gbth", xf, self.memories)
            scores = reduce_scores(d_all.norm(dim=-1).flatten(0, 1), valid.repeat(g, 1), how).view(g, b)
            best, idx = scores.max(dim=0)
            return best > self.thresholds[idx], idx, d_all[idx, rows]
        # Many memories: a faiss index over the memories' keys proposes candidates (this reads
        # the query on the host), exact activation scores pick among them.
        cand = self._candidates(xf, valid)  # (B, c)
        best = torch.full((b,), -1.0, device=xf.device)
        idx = cand[:, 0].clone()
        d_best = torch.zeros(xf.shape[:2] + (self.shape[0],), device=xf.device)
        for j in range(cand.shape[1]):
            d = torch.einsum("bti,bhi->bth", xf, self.memories[cand[:, j]])
            s = reduce_scores(d.norm(dim=-1), valid, how)
            better = s > best
            best = torch.where(better, s, best)
            idx = torch.where(better, cand[:, j], idx)
            d_best = torch.where(better[:, None, None], d, d_best)
        return best > self.thresholds[idx], idx, d_best

    def _candidates(self, xf: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        import faiss

        if self._index is None:
            keys = F.normalize(self.keys, dim=-1).cpu().numpy()
            self._index = faiss.IndexFlatIP(keys.shape[1])
            self._index.add(keys)
        q = (xf * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1.0)
        q = F.normalize(q, dim=-1).cpu().numpy()
        k = min(self.config.faiss_candidates, self.memories.shape[0])
        _, found = self._index.search(q, k)
        return torch.as_tensor(found, dtype=torch.long, device=xf.device).clamp(min=0)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the down-projection input the side memory sees: without the directions
        that carry most of the unrelated pool's activation energy (config.protect_energy)."""
        if self.basis is None or self.basis.shape[1] == 0:
            return x
        return x - (x @ self.basis) @ self.basis.T

    # ---- capturing the edited layer's inputs ------------------------------------------------
    @torch.no_grad()
    def _capture(self, rows: Rows, block_out: bool) -> dict[str, torch.Tensor]:
        """Run the unedited model up to the edited layer: the down-projection input `x` and,
        with block_out, the edited block's output `h` (main memory only)."""
        points = {"x": (self.site, "in")}
        if block_out:
            points["h"] = (Site("block", self.layer), "out")
        self._bypass = True
        try:
            got, _ = self.adapter.capture({"input_ids": rows.ids, "attention_mask": rows.attn, "use_cache": False},
                                          points)
        finally:
            self._bypass = False
        return got

    # ---- session-level caches: margin unit and context prefixes -----------------------------
    def _pool(self) -> list[str]:
        return list(self.config.unrelated_prompts or UNRELATED)

    @torch.no_grad()
    def _pool_statistics(self) -> None:
        """Once per session, from the unrelated pool's activations at the edited layer: the
        margin unit (1% of the median per-token norm of the main memory's output) and the
        principal directions the side memory is kept blind to."""
        if self.unit is not None and self.basis is not None:
            return
        rows = make_rows(self.tokenizer, [(p, None, None) for p in self._pool()]).to(self.loaded.device)
        x = self._capture(rows, block_out=False)["x"].to(torch.float32)[rows.attn.bool()]  # (N, in)
        main = F.linear(x, self.adapter.weight(self.site).to(torch.float32))
        self.unit = float(main.norm(dim=-1).median()) / 100.0
        energy = self.config.protect_energy
        if energy <= 0:
            self.basis = x.new_zeros((x.shape[1], 0))
            return
        _, sv, vh = torch.linalg.svd(x, full_matrices=False)
        share = (sv**2).cumsum(0) / (sv**2).sum()
        k = int((share < energy).sum()) + 1
        self.basis = vh[:k].T.contiguous()

    def _margin_unit(self) -> float:
        self._pool_statistics()
        if self.config.margin_unit != "auto":
            return float(self.config.margin_unit)
        return self.unit

    def _make_contexts(self, seed: int) -> list[str]:
        from editkit.generation import generate

        cfg = self.config
        out: list[str] = []
        self._bypass = True
        try:
            for li, length in enumerate(cfg.context_lengths):
                want = [i for i in range(cfg.n_contexts) if i % len(cfg.context_lengths) == li]
                if not want:
                    continue
                words = [_SEED_WORDS[i % len(_SEED_WORDS)] for i in want]
                texts = generate(self.loaded, words, max_new_tokens=length, temperature=1.0, top_p=0.95,
                                 seed=seed * 1000 + li)
                for w, t in zip(words, texts):
                    text = " ".join((w + t).replace("{", " ").replace("}", " ").split())
                    out.append(text or w)
        finally:
            self._bypass = False
        return out

    def _contexts(self) -> list[str]:
        if self.config.n_contexts == 0:
            return []
        if not self.config.cache_contexts:  # the reference procedure: new prefixes every edit
            return self._make_contexts(self.config.seed + 1 + len(self.edits))
        if self.contexts is None:
            self.contexts = self._make_contexts(self.config.seed)
        return self.contexts

    # ---- editing -------------------------------------------------------------------------
    def _current(self) -> int:
        return self.memories.shape[0] - 1

    def apply(self, request: EditRequest) -> dict[str, Any]:
        cfg = self.config
        unit = self._margin_unit()
        contexts = self._contexts()
        g = self._current()
        if self.mask is None:  # a fresh random gradient mask for every shard
            self.mask = torch.rand(self.shape, device=self.device) < cfg.mask_ratio

        n_prompt = len(self.tokenizer(request.prompt, add_special_tokens=False).input_ids)
        specs = [(request.prompt, request.target_new, None)]
        specs += [(f"{c}. {request.prompt}", request.target_new, n_prompt) for c in contexts]
        earlier = [e for e in self.edits if e["memory"] == g]
        if cfg.replay and earlier:
            pick = torch.randperm(len(earlier))[: cfg.replay].tolist()
            specs += [(earlier[i]["prompt"], earlier[i]["target"], None) for i in sorted(pick)]
        pool = self._pool()
        drawn = torch.randint(len(pool), (cfg.unrelated_per_edit,)).tolist()
        out_specs = [(pool[i], None, None) for i in drawn]

        step_fn = self._fast_steps(specs, out_specs) if cfg.fast_path else self._slow_steps(specs, out_specs)
        param = self.memories[g].clone().requires_grad_(True)
        mask = self.mask.to(param.dtype)
        adam = torch.optim.Adam([param], lr=cfg.lr) if cfg.optimizer == "adam" else None
        trajectory: list[float] = []
        ce_v = margin_v = float("nan")
        s_in = s_out = None
        steps = 0
        for steps in range(1, cfg.steps + 1):
            ce, lead, s_in, s_out = step_fn(param)
            gap = F.relu(s_out[None, :] - s_in[:, None] + cfg.gamma * unit).mean()
            low = F.relu(s_out - cfg.alpha * unit).mean()
            high = F.relu(cfg.beta * unit - s_in).mean()
            margin = gap + low + high  # in activation units, as in the paper
            loss = ce + cfg.margin_weight * margin
            ce_v, margin_v, lead_v = float(ce.detach()), float(margin.detach()), float(lead)
            trajectory.append(float(loss.detach()))
            if cfg.early_stop and self._done(ce_v, lead_v, s_in.detach(), s_out.detach(), unit):
                break
            (grad,) = torch.autograd.grad(loss, param)
            with torch.no_grad():
                if adam is None:
                    param -= cfg.lr * grad * mask
                else:  # masked entries never get a gradient, so Adam never moves them
                    param.grad = grad * mask
                    adam.step()
                    param.grad = None
                param.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
        memories = self.memories.clone()
        memories[g] = param.detach()
        self.memories = memories
        self._route = None

        self.edits.append({"prompt": request.prompt, "target": request.target_new, "memory": g})
        self._update_key(len(self.edits) - 1)
        self.shard_edits += 1
        if self.shard_edits >= cfg.shard_size:
            self._end_shard()
        self._refresh_thresholds()
        return {"loss": trajectory[-1], "ce": ce_v, "margin": margin_v, "lead": lead_v, "steps": steps,
                "memory": g, "memories": int(self.memories.shape[0]),
                "in_scope_min": float(s_in.detach().min()) / unit, "unrelated_max": float(s_out.detach().max()) / unit,
                "threshold": float(self.thresholds[g]) / unit if g < len(self.thresholds) else None,
                "trajectory": trajectory}

    def _done(self, ce: float, lead: float, s_in: torch.Tensor, s_out: torch.Tensor, unit: float) -> bool:
        """Early stop: the targets are learnt (CE below early_stop_loss, or every target token the
        greedy prediction by early_stop_lead nats) and all three margins are met."""
        cfg = self.config
        if not (ce < cfg.early_stop_loss or lead >= cfg.early_stop_lead):
            return False
        lo, hi = float(s_in.min()), float(s_out.max())
        return lo >= cfg.beta * unit and lo - hi >= cfg.gamma * unit and hi <= cfg.alpha * unit

    def _fast_steps(self, specs, out_specs):
        """Step function on cached layer inputs: only the blocks above the edited one run."""
        dev = self.loaded.device
        rows = make_rows(self.tokenizer, specs).to(dev)
        out_rows = make_rows(self.tokenizer, out_specs).to(dev)
        prompt_only = make_rows(self.tokenizer, specs, score_target=False).score.to(dev)
        cap = self._capture(rows, block_out=True)
        x_in, h_in = self._project(cap["x"].to(torch.float32)), cap["h"]
        x_out = self._project(self._capture(out_rows, block_out=False)["x"].to(torch.float32))
        gold = rows.labels[:, 1:]
        r, c = (gold != IGNORE).nonzero(as_tuple=True)  # loss positions: t predicts t + 1
        targets = gold[r, c]
        how = self.config.score_reduce

        def step(param):
            d_in = F.linear(x_in, param)
            hidden = self.adapter.run_blocks(h_in + d_in.to(h_in.dtype), self.layer + 1, attention_mask=rows.attn)
            logits = self.adapter.unembed(hidden[r, c]).float()
            ce = F.cross_entropy(logits, targets)
            norms = d_in.norm(dim=-1)  # in scope: scored on prompt + target and on the prompt alone
            s_in = torch.cat([reduce_scores(norms, rows.score, how), reduce_scores(norms, prompt_only, how)])
            s_out = reduce_scores(F.linear(x_out, param).norm(dim=-1), out_rows.attn, how)
            return ce, target_lead(logits.detach(), targets), s_in, s_out

        return step

    def _slow_steps(self, specs, out_specs):
        """Step function of the reference procedure: the whole model, every row, every position."""
        dev = self.loaded.device
        rows = make_rows(self.tokenizer, specs + out_specs).to(dev)
        n_in = len(specs)
        prompt_only = make_rows(self.tokenizer, specs + out_specs, score_target=False).score[:n_in].to(dev)
        how = self.config.score_reduce

        def step(param):
            self._train_delta = param
            try:
                logits = self.model(input_ids=rows.ids, attention_mask=rows.attn, use_cache=False).logits
                x = self._train_x.to(torch.float32)
            finally:
                self._train_delta = None
                self._train_x = None
            flat, gold = logits[:n_in, :-1].flatten(0, 1).float(), rows.labels[:n_in, 1:].flatten()
            ce = F.cross_entropy(flat, gold, ignore_index=IGNORE)
            keep = gold != IGNORE
            norms = F.linear(x, param).norm(dim=-1)
            s_in = torch.cat([reduce_scores(norms[:n_in], rows.score[:n_in], how),
                              reduce_scores(norms[:n_in], prompt_only, how)])
            s_out = reduce_scores(norms[n_in:], rows.attn[n_in:], how)
            return ce, target_lead(flat[keep].detach(), gold[keep]), s_in, s_out

        return step

    # ---- thresholds, keys, shards -----------------------------------------------------------
    def _edit_inputs(self, indices: list[int]) -> None:
        missing = [i for i in indices if i not in self._xcache]
        if not missing:
            return
        specs = [(self.edits[i]["prompt"], self.edits[i]["target"], None) for i in missing]
        rows = make_rows(self.tokenizer, specs).to(self.loaded.device)
        x = self._project(self._capture(rows, block_out=False)["x"].to(torch.float32))
        for j, i in enumerate(missing):
            p, t = encode_pair(self.tokenizer, self.edits[i]["prompt"], self.edits[i]["target"])
            self._xcache[i] = (x[j, : len(p) + len(t)].clone(), len(p), len(t))

    def _update_key(self, i: int) -> None:
        self._edit_inputs([i])
        x, p, _ = self._xcache[i]
        g = self.edits[i]["memory"]
        keys = self.keys.clone()
        keys[g] += F.normalize(x[:p].mean(0), dim=-1)
        self.keys = keys
        self._index = None

    @torch.no_grad()
    def _refresh_thresholds(self) -> None:
        """Each memory's threshold: act_ratio times the smallest score of its own edits, on the
        prompt alone (what generation sees) and on prompt + target (teacher forcing)."""
        how = self.config.score_reduce
        thresholds = torch.full((self.memories.shape[0],), float("inf"), device=self.device)
        for g in range(self.memories.shape[0]):
            own = [i for i, e in enumerate(self.edits) if e["memory"] == g]
            if not own:
                continue
            self._edit_inputs(own)
            lowest = float("inf")
            for i in own:
                x, p, t = self._xcache[i]
                norms = F.linear(x, self.memories[g]).norm(dim=-1)[None]
                for span in (p, p + t):
                    w = torch.zeros_like(norms)
                    w[:, :span] = 1.0
                    lowest = min(lowest, float(reduce_scores(norms, w, how)))
            thresholds[g] = self.config.act_ratio * lowest
        self.thresholds = thresholds
        self._route = None

    def _end_shard(self) -> None:
        cfg = self.config
        self.shards += 1
        self.shard_edits = 0
        self.mask = None  # the next edit draws a fresh mask
        if cfg.mode == "retrieve":
            out_f, in_f = self.shape
            self.memories = torch.cat([self.memories, self.memories.new_zeros((1, out_f, in_f))])
            self.keys = torch.cat([self.keys, self.keys.new_zeros((1, in_f))])
            self.thresholds = torch.cat([self.thresholds, self.thresholds.new_full((1,), float("inf"))])
            self._index = None
            return
        current = self.memories[0]
        self.pending.append(current - self.shard_base)
        if len(self.pending) >= cfg.merge_every:
            merged = self.merge_base + ties_merge(self.pending, cfg.ties_density)
            merged = merged.clamp(-cfg.norm_constraint, cfg.norm_constraint)
            self.memories = merged[None].clone()
            self.merge_base = merged.clone()
            self.pending = []
        self.shard_base = self.memories[0].clone()

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"memories": self.memories, "thresholds": self.thresholds, "keys": self.keys,
                   "shard_base": self.shard_base, "merge_base": self.merge_base}
        if self.mask is not None:
            tensors["mask"] = self.mask
        if self.pending:
            tensors["pending"] = torch.stack(self.pending)
        if self.basis is not None:
            tensors["basis"] = self.basis
        meta = {"format": STATE_FORMAT, "layer": self.layer, "shape": list(self.shape),
                "mode": self.config.mode, "edits": [dict(e) for e in self.edits],
                "shard_edits": self.shard_edits, "shards": self.shards, "unit": self.unit,
                "contexts": self.contexts}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        out_f, in_f = self.shape
        problems = []
        if meta.get("format") != STATE_FORMAT:
            problems.append(f"format {meta.get('format')}")
        if meta.get("layer") != self.layer or list(meta.get("shape", [])) != [out_f, in_f]:
            problems.append(f"layer {meta.get('layer')} shape {meta.get('shape')}")
        if meta.get("mode") != self.config.mode:
            problems.append(f"mode {meta.get('mode')}")
        mem = tensors.get("memories")
        if mem is None or mem.dim() != 3 or tuple(mem.shape[1:]) != (out_f, in_f):
            problems.append(f"memories {None if mem is None else tuple(mem.shape)}")
        else:
            g = mem.shape[0]
            for name, shape in (("thresholds", (g,)), ("keys", (g, in_f)), ("shard_base", (out_f, in_f)),
                                ("merge_base", (out_f, in_f))):
                if name not in tensors or tuple(tensors[name].shape) != shape:
                    problems.append(f"{name} shape")
            if "mask" in tensors and tuple(tensors["mask"].shape) != (out_f, in_f):
                problems.append("mask shape")
            if "basis" in tensors and (tensors["basis"].dim() != 2 or tensors["basis"].shape[0] != in_f):
                problems.append("basis shape")
            if "pending" in tensors and tuple(tensors["pending"].shape[1:]) != (out_f, in_f):
                problems.append("pending shape")
            if any(not 0 <= e.get("memory", -1) < g for e in meta.get("edits", [])):
                problems.append("edit memory index")
        if problems:
            raise WorkspaceError("wise state does not fit this model/config: " + ", ".join(problems))
        self._reset()
        put = dict(device=self.device, dtype=torch.float32)
        self.memories = tensors["memories"].to(**put).clone()
        self.thresholds = tensors["thresholds"].to(**put).clone()
        self.keys = tensors["keys"].to(**put).clone()
        self.shard_base = tensors["shard_base"].to(**put).clone()
        self.merge_base = tensors["merge_base"].to(**put).clone()
        self.mask = tensors["mask"].to(self.device, torch.bool).clone() if "mask" in tensors else None
        self.pending = [p.to(**put).clone() for p in tensors["pending"]] if "pending" in tensors else []
        self.edits = [dict(e) for e in meta.get("edits", [])]
        self.shard_edits = int(meta.get("shard_edits", 0))
        self.shards = int(meta.get("shards", 0))
        self.unit = meta.get("unit")
        self.basis = tensors["basis"].to(**put).clone() if "basis" in tensors else None
        self.contexts = meta.get("contexts")
