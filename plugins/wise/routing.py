"""WISE at inference: the down-projection hook and the router that decides, per sequence,
whether (and through which side memory) it goes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from editkit.forward import call_context
from editkit.search import faiss


SCAN_CHUNK = 16  # memories scored together by the exact scan
# a state at block subject_layer this many times the typical norm is an attention sink (on the
# default model the first token's are 5-8x, "the" in "located in the continent" 6.5x; subject
# tokens at most 3.1x, 1.4x for 99 in 100)
SINK_RATIO = 4.0


def sink_tokens(states: torch.Tensor, valid: torch.Tensor, typical: float) -> torch.Tensor:
    """(B, T) True at each row's first valid token and wherever the state's norm exceeds
    SINK_RATIO x `typical`: attention sinks, whose states are alike whatever the token (cosine
    0.98-1.00 with every subject key on the default model), so subject_gate compares none of them."""
    first = (valid > 0) & (valid.cumsum(1) == 1)
    return first | (states.norm(dim=-1) > SINK_RATIO * typical)


def typical_norm(states: torch.Tensor, valid: torch.Tensor) -> float:
    """The median state norm over the valid tokens of (B, T, H) `states`, first tokens left out:
    the `typical` norm sink_tokens compares to."""
    keep = (valid > 0) & ~sink_tokens(states, valid, float("inf"))
    return float(states.norm(dim=-1)[keep].median())


def reduce_scores(token_norms: torch.Tensor, weight: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T) per-token distances and 0/1 weights -> (B,) sequence scores."""
    weight = weight.to(token_norms.dtype)
    if how == "max":
        return torch.where(weight > 0, token_norms, torch.zeros_like(token_norms)).amax(dim=1)
    return (token_norms * weight).sum(1) / weight.sum(1).clamp(min=1.0)



def _masked_cols(sims: torch.Tensor, cols: torch.Tensor, miss: torch.Tensor) -> torch.Tensor:
    """sims with entries (row, cols[j]) set to -2 where miss[row, j]."""
    out = sims.clone()
    out[:, cols] = sims[:, cols].masked_fill(miss, -2.0)
    return out


class Routing:
    """The WISEEditor's inference half (a mixin: the state lives on the editor)."""

    def _model_pre_hook(self, module, args, kwargs):
        self._call = call_context(args, kwargs)
        self._subject_x = None

    def _subject_hook(self, module, inputs, output):
        self._subject_x = output[0] if isinstance(output, tuple) else output

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
            self._route = (route, idx, {})
            return route, delta_out
        route, idx, held = self._route
        if len(self.memories) == 1:
            return route, F.linear(xf, self.memories[0])
        return route, self._memory_outputs(xf, idx, route, held)

    def _memory_outputs(self, xf: torch.Tensor, idx: torch.Tensor, route: torch.Tensor,
                        held: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, T, out): each routed row through its own memory idx[row] (zeros for the others),
        memory by memory over the rows that use it (a gathered copy of every row's memory cost
        3.5 MB per row and step here). `held` keeps the memories unpacked for the decoding steps
        of one batch, however many distinct memories it routes to (the bank caches only a few)."""
        out = xf.new_zeros(xf.shape[:2] + (self.shape[0],))
        for m in torch.unique(idx[route]).tolist():
            sel = ((idx == m) & route).nonzero().squeeze(1)
            weight = held.get(m) if held is not None else None
            if weight is None:
                weight = self.memories[m]
                if held is not None:
                    held[m] = weight
            out[sel] = F.linear(xf[sel], weight)
        return out

    def _decide(self, xf: torch.Tensor, valid: torch.Tensor):
        how = self.config.score_reduce
        g = len(self.memories)
        b = xf.shape[0]
        if self.config.key_gate is not None:  # only memories holding an edit near the sequence
            return self._pick(xf, valid, self._near_memories(xf, valid))
        if g == 1:
            d = F.linear(xf, self.memories[0])
            score = reduce_scores(d.norm(dim=-1), valid, how)
            idx = torch.zeros(b, dtype=torch.long, device=xf.device)
            return score > self.thresholds[0], idx, d
        prefilter = self.config.faiss_min_memories
        if prefilter is None or g < prefilter or faiss() is None:  # top-1 over every memory, scored exactly
            scores = torch.cat([  # SCAN_CHUNK memories at a time: the (memories, B, T, out) outputs stay small
                reduce_scores(torch.einsum("bti,ghi->gbth", xf, chunk).norm(dim=-1).flatten(0, 1),
                              valid.repeat(chunk.shape[0], 1), how).view(chunk.shape[0], b)
                for chunk in self.memories.chunks(SCAN_CHUNK)])
            best, idx = scores.max(dim=0)
            route = best > self.thresholds[idx]
            return route, idx, self._memory_outputs(xf, idx, route)
        # Many memories: a faiss index over the memories' keys proposes candidates (this reads
        # the query on the host), exact activation scores pick among them.
        return self._pick(xf, valid, self._candidates(xf, valid))

    def _pick(self, xf: torch.Tensor, valid: torch.Tensor, cand: torch.Tensor):
        """Route each row to the best-scoring of its candidate memories (B, c), -1 = no candidate;
        a row routes where that score clears the memory's threshold."""
        b = xf.shape[0]
        best = torch.full((b,), -1.0, device=xf.device)
        idx = cand[:, 0].clamp(min=0)
        d_best = torch.zeros(xf.shape[:2] + (self.shape[0],), device=xf.device)
        # memory by memory over the rows that proposed it (gathering a copy of each row's
        # candidates cost more than scanning every memory); ties go to the earlier candidate
        rank = torch.full((b,), cand.shape[1], dtype=torch.long, device=xf.device)
        for m in torch.unique(cand).tolist():
            if m < 0:
                continue
            hit = cand == m
            sel = hit.any(1).nonzero().squeeze(1)
            d = F.linear(xf[sel], self.memories[m])
            s = reduce_scores(d.norm(dim=-1), valid[sel], self.config.score_reduce)
            r = hit[sel].float().argmax(1)  # this memory's place in each row's candidate list
            better = (s > best[sel]) | ((s == best[sel]) & (r < rank[sel]))
            rows_b = sel[better]
            best[rows_b], idx[rows_b], rank[rows_b] = s[better], m, r[better]
            d_best[rows_b] = d[better]
        return (best >= 0) & (best > self.thresholds[idx]), idx, d_best

    @staticmethod
    def _query(xf: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, in): each sequence's mean input over its valid tokens, unit length (the key a
        memory and an edit are compared by)."""
        q = (xf * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1.0)
        return F.normalize(q, dim=-1)

    def _candidates(self, xf: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self._index is None:
            keys = F.normalize(self.keys, dim=-1).cpu().numpy()
            self._index = faiss().IndexFlatIP(keys.shape[1])
            self._index.add(keys)
        q = self._query(xf, valid).cpu().numpy()
        k = min(self.config.faiss_candidates, len(self.memories))
        _, found = self._index.search(q, k)
        return torch.as_tensor(found, dtype=torch.long, device=xf.device).clamp(min=0)

    def _near_memories(self, xf: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, c) candidates under config.key_gate: the memories holding an edit one of whose keys
        (its prompt's, its prompt's and target's) has cosine >= key_gate with the sequence's,
        nearest first, at most faiss_candidates of them, -1 where fewer. A memory answers only
        what is worded like one of its own edits."""
        b, g = xf.shape[0], len(self.memories)
        c = min(self.config.faiss_candidates, g)
        if not self.edits:
            return torch.full((b, c), -1, dtype=torch.long, device=xf.device)
        sims = torch.einsum("bi,nki->bnk", self._query(xf, valid), self.edit_keys).amax(2)  # (B, edits)
        if self.config.subject_gate is not None:
            sims = self._subject_check(sims, valid)
        if self._edit_memory is None:
            self._edit_memory = torch.tensor([e["memory"] for e in self.edits], device=xf.device)
        per = sims.new_full((b, g), -2.0).scatter_reduce(1, self._edit_memory.expand(b, -1), sims, "amax")
        near, found = per.topk(c, dim=1)
        return torch.where(near >= self.config.key_gate, found, torch.full_like(found, -1))

    def _subject_check(self, sims: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """sims (B, edits) with every edit that has a subject key, none of the sequence's tokens
        resembling it (cosine < subject_gate at block subject_layer; attention sinks left out),
        set below any gate. Only edits that pass key_gate for some row are compared."""
        cols = ((sims >= self.config.key_gate).any(0) & self.subject_known).nonzero().squeeze(1)
        if cols.numel() == 0:
            return sims
        s = self._subject_x
        if s is None or s.shape[:2] != valid.shape:
            raise RuntimeError("the subject states of this pass were not captured")
        s = s.to(self.subject_keys.device, torch.float32)  # that block may sit on another device
        valid = valid.to(s.device)
        skip = (valid <= 0) | sink_tokens(s, valid, self.subject_norm)
        near = torch.einsum("bth,nh->btn", F.normalize(s, dim=-1), self.subject_keys[cols])
        near = near.masked_fill(skip[..., None], -2.0).amax(1)  # (B, cols)
        return _masked_cols(sims, cols, near < self.config.subject_gate)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the down-projection input the side memory sees: without the directions
        that carry most of the unrelated pool's activation energy (config.protect_energy)."""
        if self.basis is None or self.basis.shape[1] == 0:
            return x
        return x - (x @ self.basis) @ self.basis.T
