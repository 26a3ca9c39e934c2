"""WISE training: capturing the edited layer's inputs, the session-level margin unit and
context prefixes, and the step functions (fast: cached inputs, only the blocks above the
edited one; slow: the whole model, as EasyEdit trains)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from editkit.sites import Site
from editkit.tokens import IGNORE
from editkit.unrelated import UNRELATED

from .routing import reduce_scores
from .rows import Rows, make_rows

_SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


class EditInputs(NamedTuple):
    """One edit's prompt + target row at the edited layer, unpadded: the projected
    down-projection input `x` (float32) and the edited block's output `h` (main memory only).
    The main model is frozen, so they never change while the edit's memory trains."""

    x: torch.Tensor  # (prompt_len + target_len, in)
    h: torch.Tensor  # (prompt_len + target_len, hidden)
    prompt_len: int
    target_len: int


def _padded(t: torch.Tensor, width: int) -> torch.Tensor:
    """(n, d) or (B, n, d) right-padded with zeros to `width` positions."""
    return F.pad(t, (0, 0, 0, width - t.shape[-2]))


def row_leads(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(N, V) logits at the loss positions, their (N,) targets and (N,) row indices -> (n_rows,)
    each row's smallest lead, in nats of log-probability, of a target token over the best other
    token (negative where a target is not the greedy prediction; +inf for a row without one)."""
    tgt = logits.gather(1, targets[:, None])[:, 0]
    other = logits.scatter(1, targets[:, None], float("-inf")).amax(dim=1)
    lead = (tgt - other).float()
    return lead.new_full((n_rows,), float("inf")).scatter_reduce(0, rows, lead, "amin")


class Training:
    """The WISEEditor's training half (a mixin: the state lives on the editor)."""

    # ---- capturing the edited layer's inputs ------------------------------------------------
    @torch.no_grad()
    def _capture(self, rows: Rows, block_out: bool) -> dict[str, torch.Tensor]:
        """Run the unedited model up to the edited layer: the down-projection input `x` and,
        with block_out, the edited block's output `h` (main memory only)."""
        points = {"x": (self.site, "in")}
        if block_out:
            points["h"] = (Site("block", self.layer), "out")
        return self._capture_at(rows, points)

    @torch.no_grad()
    def _capture_at(self, rows: Rows, points: dict[str, tuple[Site, str]]) -> dict[str, torch.Tensor]:
        """Run the unedited model (no side memory) on `rows` until every point is captured."""
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
        x, attn = self._pool_raw = self._pool_capture()  # _pool_inputs projects it once the basis is known
        x = x[attn.bool()]  # (N, in)
        main = F.linear(x, self.adapter.weight_values(self.site).to(x.device, torch.float32))
        self.unit = float(main.norm(dim=-1).median()) / 100.0
        energy = self.config.protect_energy
        if energy <= 0:
            self.basis = x.new_zeros((x.shape[1], 0))
            return
        _, sv, vh = torch.linalg.svd(x, full_matrices=False)
        share = (sv**2).cumsum(0) / (sv**2).sum()
        k = int((share < energy).sum()) + 1
        self.basis = vh[:k].T.contiguous()

    def _pool_capture(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unrelated pool's down-projection inputs (N, T, in; float32) and valid-token mask
        (N, T), in one fixed batch (so a replayed stream sees the same values)."""
        rows = make_rows(self.tokenizer, [(p, None, None) for p in self._pool()]).to(self.loaded.device)
        return self._capture(rows, block_out=False)["x"].to(torch.float32), rows.attn

    @torch.no_grad()
    def _pool_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unrelated pool's projected down-projection inputs (N, T, in) and valid-token mask
        (N, T): they depend on the main model alone and every edit draws from them, so they are
        captured once per session (the capture _pool_statistics made, when it ran)."""
        if self._pool_x is None:
            x, attn = self._pool_raw if self._pool_raw is not None else self._pool_capture()
            self._pool_raw = None
            self._pool_x = (self._project(x), attn)
        return self._pool_x

    def _out_inputs(self, drawn: list[int], out_specs) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The out-of-scope rows: the drawn pool prompts (cached), then `out_specs` (captured
        now). Returns their valid tokens' inputs (N, in), those tokens' (row, position) and the
        rows' valid-token mask (B, T): padding is never multiplied by the side memory."""
        pool_x, pool_attn = self._pool_inputs()
        parts = [(pool_x[drawn], pool_attn[drawn])]
        if out_specs:
            rows = make_rows(self.tokenizer, out_specs).to(self.loaded.device)
            parts.append((self._project(self._capture(rows, block_out=False)["x"].to(torch.float32)), rows.attn))
        width = max(int(m.sum(1).max()) for _, m in parts)
        xs = [F.pad(x[:, :width], (0, 0, 0, max(0, width - x.shape[1]))) for x, _ in parts]
        masks = torch.cat([F.pad(m[:, :width], (0, max(0, width - m.shape[1]))) for _, m in parts])
        where = masks.bool().nonzero(as_tuple=True)
        return torch.cat(xs)[where], where, masks

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
        if not self.config.cache_contexts:  # an ablation: new prefixes every edit
            return self._make_contexts(self.config.seed + 1 + len(self.edits))
        if self.contexts is None:
            self.contexts = self._make_contexts(self.config.seed)
        return self.contexts

    def _targets_learnt(self, ce: float, leads: torch.Tensor, need: torch.Tensor) -> bool:
        """The target cross-entropy is below early_stop_loss, or every row's target tokens are the
        greedy prediction by the lead that row needs (`need`: early_stop_lead for the edit's own
        rows; a replayed edit's must stay the greedy prediction, or no worse than at the first
        step)."""
        return ce < self.config.early_stop_loss or bool((leads >= need).all())

    def _margins_met(self, s_in: torch.Tensor, s_out: torch.Tensor, unit: float, far: int | None = None) -> bool:
        """All three activation margins hold, within margin_tolerance (in-scope above beta,
        unrelated below alpha, and apart by gamma); only the first `far` unrelated scores need
        to be below alpha (all of them by default)."""
        cfg = self.config
        lo, hi, tol = float(s_in.min()), float(s_out.max()), cfg.margin_tolerance
        far = s_out.numel() if far is None else far
        below_alpha = far == 0 or float(s_out[:far].max()) <= (cfg.alpha + tol) * unit
        return lo >= (cfg.beta - tol) * unit and lo - hi >= (cfg.gamma - tol) * unit and below_alpha

    @staticmethod
    def _flat(trajectory: list[float]) -> bool:
        """EasyEdit's early stop: the total loss is at most 0.02 and moved at most 1e-4."""
        return len(trajectory) > 1 and trajectory[-1] <= 0.02 and abs(trajectory[-1] - trajectory[-2]) <= 1e-4

    @staticmethod
    def _violated_mean(hinge: torch.Tensor) -> torch.Tensor:
        """Mean over the violated entries of a hinge (EasyEdit's margin loss); 0 when none is."""
        return hinge.sum() / (hinge > 0).sum().clamp(min=1)

    def _fast_steps(self, specs, drawn, out_specs, replayed=(), kept=()):
        """Step function on cached layer inputs: only the blocks above the edited one run.
        `specs` are the edit's own rows (captured now; the first is its prompt + target) followed
        by replayed edits' rows, whose inputs `replayed` (EditInputs) were captured when they
        were made. Out of scope: the unrelated pool's prompts `drawn`, then `out_specs`. `kept`
        (EditInputs) count in the in-scope activation scores only (no cross-entropy), so they
        cost nothing above the edited layer. Returns the step function and the edit's own
        EditInputs (for the cache, once the edit is made)."""
        dev = self.loaded.device
        rows = make_rows(self.tokenizer, specs).to(dev)
        prompt_only = make_rows(self.tokenizer, specs, score_target=False).score.to(dev)
        width, new = rows.ids.shape[1], len(specs) - len(replayed)
        own_width = int(rows.attn[:new].sum(1).max())
        cap = self._capture(Rows(rows.ids[:new, :own_width], rows.attn[:new, :own_width],
                                 rows.labels[:new, :own_width], rows.score[:new, :own_width]), block_out=True)
        x_new, h_new = self._project(cap["x"].to(torch.float32)), cap["h"]
        x_in = torch.cat([_padded(x_new, width)] + [_padded(e.x, width)[None] for e in replayed])
        h_in = torch.cat([_padded(h_new, width)] + [_padded(e.h.to(h_new.dtype), width)[None] for e in replayed])
        length = int(rows.attn[0].sum())
        target_len = int((rows.labels[0] != IGNORE).sum())
        own = EditInputs(x_new[0, :length].clone(), h_new[0, :length].clone(), length - target_len, target_len)
        x_out, out_at, out_attn = self._out_inputs(drawn, out_specs)
        keep = None
        if kept:
            k_width = max(e.x.shape[0] for e in kept)
            k_x = torch.stack([_padded(e.x, k_width) for e in kept])
            k_score = torch.zeros(k_x.shape[:2], device=k_x.device)
            k_prompt = torch.zeros_like(k_score)
            for j, e in enumerate(kept):
                k_score[j, : e.prompt_len + e.target_len] = 1.0
                k_prompt[j, : e.prompt_len] = 1.0
            keep = (k_x, k_score, k_prompt)
        gold = rows.labels[:, 1:]
        r, c = (gold != IGNORE).nonzero(as_tuple=True)  # loss positions: t predicts t + 1, row-major
        targets = gold[r, c]
        # the blocks above run the edit's rows and the (shorter) replayed rows as two batches,
        # each only as wide as its longest row: padding is work the layers above would waste
        groups = [(lo, hi, int(rows.attn[lo:hi].sum(1).max())) for lo, hi in ((0, new), (new, len(specs))) if hi > lo]
        at = [(r[(r >= lo) & (r < hi)] - lo, c[(r >= lo) & (r < hi)]) for lo, hi, _ in groups]
        how = self.config.score_reduce

        def step(param, run_targets=True):
            """(cross-entropy, each row's smallest target lead, in-scope scores, unrelated scores);
            without run_targets the layers above are skipped: cross-entropy 0 and leads None."""
            d_in = F.linear(x_in, param)
            if run_targets:
                h = h_in + d_in.to(h_in.dtype)
                picked = [self.adapter.run_blocks(h[lo:hi, :w], self.layer + 1, attention_mask=rows.attn[lo:hi, :w])[gr, gc]
                          for (lo, hi, w), (gr, gc) in zip(groups, at)]
                logits = self.adapter.unembed(torch.cat(picked)).float()
                ce, lead = F.cross_entropy(logits, targets), row_leads(logits.detach(), targets, r, len(specs))
            else:
                ce, lead = d_in.new_zeros(()), None
            norms = d_in.norm(dim=-1)  # in scope: scored on prompt + target and on the prompt alone
            s_in = [reduce_scores(norms, rows.score, how), reduce_scores(norms, prompt_only, how)]
            if keep is not None:
                k_norms = F.linear(keep[0], param).norm(dim=-1)
                s_in += [reduce_scores(k_norms, keep[1], how), reduce_scores(k_norms, keep[2], how)]
            out_norms = out_attn.new_zeros(out_attn.shape, dtype=d_in.dtype).index_put(out_at, F.linear(x_out, param).norm(dim=-1))
            s_out = reduce_scores(out_norms, out_attn, how)
            return ce, lead, torch.cat(s_in), s_out

        return step, own

    def _slow_steps(self, specs, out_specs, keep_specs=()):
        """Step function of the full-model path: the whole model, every row, every position
        (cross-entropy on `specs` only; `keep_specs` count in the in-scope scores)."""
        dev = self.loaded.device
        scored = list(specs) + list(keep_specs)
        rows = make_rows(self.tokenizer, scored + out_specs).to(dev)
        n_ce, n_in = len(specs), len(scored)
        prompt_only = make_rows(self.tokenizer, scored + out_specs, score_target=False).score[:n_in].to(dev)
        how = self.config.score_reduce

        def step(param, run_targets=True):  # the full-model ablation always runs the targets
            self._train_delta = param
            try:
                logits = self.model(input_ids=rows.ids, attention_mask=rows.attn, use_cache=False).logits
                x = self._train_x.to(torch.float32)
            finally:
                self._train_delta = None
                self._train_x = None
            flat, gold = logits[:n_ce, :-1].flatten(0, 1).float(), rows.labels[:n_ce, 1:].flatten()
            ce = F.cross_entropy(flat, gold, ignore_index=IGNORE)
            keep = gold != IGNORE
            norms = F.linear(x, param).norm(dim=-1)
            # in-scope scores in the fast path's order: the edit's rows, then the kept ones
            s_in = torch.cat([reduce_scores(norms[:n_ce], rows.score[:n_ce], how),
                              reduce_scores(norms[:n_ce], prompt_only[:n_ce], how),
                              reduce_scores(norms[n_ce:n_in], rows.score[n_ce:n_in], how),
                              reduce_scores(norms[n_ce:n_in], prompt_only[n_ce:], how)])
            s_out = reduce_scores(norms[n_in:], rows.attn[n_in:], how)
            row = torch.arange(gold.numel(), device=gold.device) // (logits.shape[1] - 1)  # (B, T - 1) flattened
            return ce, row_leads(flat[keep].detach(), gold[keep], row[keep], n_ce), s_in, s_out

        return step
