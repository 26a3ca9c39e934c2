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

from typing import Any

import torch
import torch.nn.functional as F

from editkit.components import Editor
from editkit.schemas import EditRequest
from editkit.sites import Site
from editkit.errors import InvalidRequest
from editkit.tokens import encode_pair, subject_position
from editkit.unrelated import SUBJECTS

from .bank import MemoryBank, appended
from .config import WISEConfig
from .merge import ties_merge
from .routing import Routing, reduce_scores, sink_tokens, typical_norm
from .rows import make_rows
from .state import StateIO
from .train import EditInputs, Training


class WISEEditor(Routing, Training, StateIO, Editor):
    name = "wise"
    Config = WISEConfig
    reads_whole_input = True  # a sequence is routed by all of its tokens
    # An edit changes the memory being trained (and its rows of `keys`, `thresholds`); finished
    # memories are only appended, so saving an edit does not grow with the memories before it.
    tracks_changes = True
    description = "WISE: routed side memory of one MLP down-projection with knowledge sharding"
    export_refusal = ("WISE routes each sequence through a side memory only when its activation score clears "
                      "the memory's threshold; a checkpoint has one set of weights for every input, so the "
                      "routing (and every retrieve-mode memory but one) would be lost")

    # ---- attach / detach ---------------------------------------------------------------
    def attach(self) -> None:
        cfg = self.config
        self.layer = self.adapter.layer_index(cfg.layer)
        self.site = Site("mlp.down", self.layer)
        self.down = self.adapter.module(self.site)
        in_f, out_f = self.adapter.linear_features(self.site)
        self.shape = (out_f, in_f)
        self.device = self.adapter.device(self.site)
        self.subject_block = self.adapter.layer_index(cfg.subject_layer)
        if cfg.subject_gate is not None and self.subject_block >= self.layer:
            raise InvalidRequest(f"subject_layer resolves to block {self.subject_block}, not below the edited layer {self.layer}")
        self._reset()
        self.hook(self.down, self._down_hook)
        if self.subject_block < self.layer:  # the states subject_gate compares (kept by reference, not copied)
            self.hook(self.adapter.module(Site("block", self.subject_block)), self._subject_hook)
        self.hook(self.model, self._model_pre_hook, pre=True, with_kwargs=True)
        self.attached = True

    def _reset(self) -> None:
        out_f, in_f = self.shape
        z = dict(dtype=torch.float32, device=self.device)
        self.memories = MemoryBank(self.shape, self.device, getattr(torch, self.config.packed_dtype),
                                   lambda *rows: self.changes.mark(*rows))  # side minus main, one per memory
        self.thresholds = torch.full((1,), float("inf"), **z)
        self.keys = torch.zeros((1, in_f), **z)  # retrieve: mean normalised input of each memory's edits
        # key_gate: each edit's keys, unit length: its prompt's mean input, and its prompt's and
        # target's (a teacher-forced or continued sequence holds the target too)
        self.edit_keys = torch.zeros((0, 2, in_f), **z)
        # subject_gate: each edit's subject key (unit state of its subject's last token at block
        # subject_layer), and whether it has one (a subject found in its prompt)
        self.subject_keys = torch.zeros((0, self.adapter.hidden_size), **z)
        self.subject_known = torch.zeros((0,), dtype=torch.bool, device=self.device)
        self._subject_x: torch.Tensor | None = None  # block subject_layer's output in the current pass
        self.subject_norm: float | None = None  # typical state norm at that block (_typical_subject_norm)
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
        self._xcache: dict[int, EditInputs] = {}  # edit index -> its inputs at the edited layer
        self._pool_x: tuple[torch.Tensor, torch.Tensor] | None = None  # the unrelated pool's inputs, once per session
        self._pool_raw: tuple[torch.Tensor, torch.Tensor] | None = None  # the pool's capture, until projected
        self._bypass = False
        self._train_delta: torch.Tensor | None = None
        self._train_x: torch.Tensor | None = None
        self._call: tuple[Any, int] = (None, 0)
        self._route: tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]] | None = None  # route, memory, held
        self._index = None
        self._edit_memory: torch.Tensor | None = None  # (edits,) memory of each edit, for key_gate
        self._buffers: dict[str, torch.Tensor] = {}  # name -> rows with spare capacity (_append_row)

    # ---- editing -------------------------------------------------------------------------
    def _current(self) -> int:
        return len(self.memories) - 1

    def apply(self, request: EditRequest) -> dict[str, Any]:
        cfg = self.config
        unit = self._margin_unit()
        contexts = self._contexts()
        g = self._current()
        if self.mask is None:  # a fresh random gradient mask for every shard
            self.mask = torch.rand(self.shape, device=self.device) < cfg.mask_ratio
            self.changes.mark("mask")

        n_prompt = len(self.tokenizer(request.prompt, add_special_tokens=False).input_ids)
        specs = [(request.prompt, request.target_new, None)]
        specs += [(f"{c}. {request.prompt}", request.target_new, n_prompt) for c in contexts]
        earlier = self._drawn([i for i, e in enumerate(self.edits) if e["memory"] == g], cfg.replay)
        own = len(specs)  # the edit's own rows; replayed edits follow
        if cfg.replay_mode == "train":
            specs += self._specs(earlier)
        # the lead each trained row's targets need: the edit's own rows early_stop_lead; a
        # replayed edit's (set at the first check) only that they stay the greedy prediction,
        # or no worse than they were (a hard earlier edit would otherwise hold every later
        # edit of its memory to the step limit)
        need = torch.full((len(specs),), cfg.early_stop_lead, device=self.loaded.device)
        pool = self._pool()
        drawn = torch.randint(len(pool), (cfg.unrelated_per_edit,)).tolist()
        out_specs = []  # out of scope besides the drawn unrelated prompts
        if cfg.mode == "retrieve" and cfg.stream_negatives:  # other memories' edits must not fire here (top-1 tells them apart)
            others = [i for i, e in enumerate(self.edits) if e["memory"] != g]
            out_specs += self._specs(self._drawn(others, cfg.stream_negatives))
        near = self._other_subjects(request)
        out_specs += [(p, None, None) for p in near]
        # out-of-scope rows held below alpha (the rest, the subject-swapped prompts, last in
        # s_out, only gamma below the edit's scores when subject_negatives_below is "edit")
        far = cfg.unrelated_per_edit + len(out_specs) - (len(near) if cfg.subject_negatives_below == "edit" else 0)

        inputs = None  # the edit's own EditInputs, when the fast path captured them
        if cfg.fast_path:
            self._edit_inputs(earlier)  # captured once per edit, kept while its memory trains
            replayed = [self._xcache[i] for i in earlier]
            trained = replayed if cfg.replay_mode == "train" else []
            kept = replayed if cfg.replay_mode == "activation" else []
            step_fn, inputs = self._fast_steps(specs, drawn, out_specs, trained, kept)
        else:
            keep_specs = self._specs(earlier) if cfg.replay_mode == "activation" else []
            step_fn = self._slow_steps(specs, [(pool[i], None, None) for i in drawn] + out_specs, keep_specs)
        param = self.memories[g].clone().requires_grad_(True)
        mask = self.mask.to(param.dtype)
        adam = torch.optim.Adam([param], lr=cfg.lr) if cfg.optimizer == "adam" else None
        trajectory: list[float] = []  # total loss at every step
        checked: list[float] = []  # total loss at the steps that ran the targets (EasyEdit's meter reads these)
        ce_v = margin_v = lead_v = float("nan")
        s_in = s_out = None
        steps = since_check = 0
        learnt = verify = False
        mean = self._violated_mean if cfg.margin_mean == "violated" else torch.mean
        for steps in range(1, cfg.steps + 1):
            # Once the targets are learnt, most steps only push the activation margins, which
            # need no layer above the edited one; the targets are checked again every
            # target_check_every steps and before stopping.
            run_targets = not learnt or verify or since_check + 1 >= cfg.target_check_every
            ce, leads, s_in, s_out = step_fn(param, run_targets)
            gap = mean(F.relu(s_out[None, :] - s_in[:, None] + cfg.gamma * unit))
            low = mean(F.relu(s_out[:far] - cfg.alpha * unit))
            high = mean(F.relu(cfg.beta * unit - s_in))
            margin = gap + low + high  # in activation units, as in the paper
            loss = ce + cfg.margin_weight * margin
            trajectory.append(float(loss.detach()))
            margin_v = float(margin.detach())
            met = self._margins_met(s_in.detach(), s_out.detach(), unit, far)
            if leads is None:
                since_check += 1
                verify = met
            else:
                since_check, verify = 0, False
                if not checked:
                    need[own:] = leads[own:].clamp(max=0.0)
                ce_v, lead_v = float(ce.detach()), float(leads[:own].min())
                learnt = self._targets_learnt(ce_v, leads, need)
                checked.append(trajectory[-1])
                if cfg.early_stop and (self._flat(checked) if cfg.early_stop_flat else learnt and met):
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
        with torch.no_grad():  # in place: copying every memory per edit would grow with the stream
            self.memories.set_current(param.detach())
        self._route = None

        self.edits.append({"prompt": request.prompt, "target": request.target_new, "memory": g,
                           "subject": request.subject})
        if inputs is not None:
            self._xcache[len(self.edits) - 1] = inputs
        self._update_key(len(self.edits) - 1)
        self.shard_edits += 1
        if self.shard_edits >= cfg.shard_size:
            self._end_shard()
        g = self.edits[-1]["memory"]  # a retrieve merge may have moved it
        self._refresh_threshold(g)
        if g != self._current():  # a finished retrieve memory never trains again: drop its cached inputs
            self._xcache = {i: v for i, v in self._xcache.items() if self.edits[i]["memory"] != g}
        return {"loss": trajectory[-1], "ce": ce_v, "margin": margin_v, "lead": lead_v, "steps": steps,
                "target_steps": len(checked),
                "memory": g, "memories": len(self.memories),
                "in_scope_min": float(s_in.detach().min()) / unit, "unrelated_max": float(s_out.detach().max()) / unit,
                "threshold": float(self.thresholds[g]) / unit if g < len(self.thresholds) else None,
                "trajectory": trajectory}

    def _other_subjects(self, request: EditRequest) -> list[str]:
        """The edit's prompt about config.subject_negatives other subjects (drawn at random from
        editkit.unrelated.SUBJECTS); none without a subject that occurs in the prompt."""
        n, subject = self.config.subject_negatives, request.subject
        if not n or not subject or subject not in request.prompt:
            return []
        others = [s for s in SUBJECTS if s != subject]
        pick = torch.randperm(len(others))[:n].tolist()
        return [request.prompt.replace(subject, others[i]) for i in pick]

    @staticmethod
    def _drawn(indices: list[int], n: int) -> list[int]:
        """At most n of the edit `indices`, drawn at random, in stream order."""
        if not n or not indices:
            return []
        pick = torch.randperm(len(indices))[:n].tolist()
        return [indices[i] for i in sorted(pick)]

    def _specs(self, indices: list[int]) -> list[tuple[str, str, None]]:
        return [(self.edits[i]["prompt"], self.edits[i]["target"], None) for i in indices]

    # ---- thresholds, keys, shards -----------------------------------------------------------
    def _edit_inputs(self, indices: list[int]) -> None:
        """Capture into the cache the EditInputs of the edits in `indices` that it lacks."""
        missing = [i for i in indices if i not in self._xcache]
        if not missing:
            return
        rows = make_rows(self.tokenizer, self._specs(missing)).to(self.loaded.device)
        cap = self._capture(rows, block_out=True)
        x = self._project(cap["x"].to(torch.float32))
        for j, i in enumerate(missing):
            p, t = encode_pair(self.tokenizer, self.edits[i]["prompt"], self.edits[i]["target"])
            n = len(p) + len(t)
            self._xcache[i] = EditInputs(x[j, :n].clone(), cap["h"][j, :n].clone(), len(p), len(t))

    def _update_key(self, i: int) -> None:
        self._edit_inputs([i])
        x, _, p, t = self._xcache[i]
        g = self.edits[i]["memory"]
        key = F.normalize(x[:p].mean(0), dim=-1)
        self.keys[g] += key
        self.changes.mark("keys", g, g + 1)
        self._append_row("edit_keys", torch.stack([key, F.normalize(x[:p + t].mean(0), dim=-1)])[None])
        subject_key, known = self._subject_keys_of([self.edits[i]])
        self._append_row("subject_keys", subject_key)
        self._append_row("subject_known", known)
        self._index = None
        self._edit_memory = None

    @torch.no_grad()
    def _subject_keys_of(self, edits: list[dict[str, Any]], batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(len(edits), hidden) subject keys and (len(edits),) whether each edit has one: the unit
        output of block subject_layer at the last token of the edit's subject in its prompt
        (SUBJECT_KEY_RULE in state.py names this rule)."""
        keys = torch.zeros((len(edits), self.adapter.hidden_size), dtype=torch.float32, device=self.device)
        known = torch.zeros((len(edits),), dtype=torch.bool, device=self.device)
        found = [(i, pos) for i, e in enumerate(edits)
                 if (pos := subject_position(self.tokenizer, e["prompt"], e.get("subject"))) is not None]
        typical = self._typical_subject_norm() if found else 0.0
        for start in range(0, len(found), batch):
            chunk = found[start:start + batch]
            rows = make_rows(self.tokenizer, [(edits[i]["prompt"], None, None) for i, _ in chunk]).to(self.loaded.device)
            got = self._capture_at(rows, {"s": (Site("block", self.subject_block), "out")})["s"].to(keys)
            sinks = sink_tokens(got, rows.attn.to(keys), typical)
            for j, (i, pos) in enumerate(chunk):
                if not sinks[j, pos]:  # a subject ending on an attention sink (e.g. the first token) has no key
                    keys[i] = F.normalize(got[j, pos], dim=-1)
                    known[i] = True
        return keys, known

    @torch.no_grad()
    def _typical_subject_norm(self) -> float:
        """The median state norm at block subject_layer over the unrelated pool's tokens, first
        tokens left out: what sink_tokens compares a state's norm to (kept with the state)."""
        if self.subject_norm is None:
            rows = make_rows(self.tokenizer, [(p, None, None) for p in self._pool()]).to(self.loaded.device)
            states = self._capture_at(rows, {"s": (Site("block", self.subject_block), "out")})["s"].float()
            self.subject_norm = typical_norm(states, rows.attn.to(states))
        return self.subject_norm

    @torch.no_grad()
    def _edit_keys_of(self, edits: list[dict[str, Any]], batch: int = 32) -> torch.Tensor:
        """(len(edits), 2, in): the keys _update_key gives each edit (its prompt's mean input at the
        edited layer, and its prompt's and target's), captured `batch` edits at a time."""
        keys = []
        for i in range(0, len(edits), batch):
            specs = [(e["prompt"], e["target"], None) for e in edits[i:i + batch]]
            rows = make_rows(self.tokenizer, specs, score_target=False).to(self.loaded.device)
            x = self._project(self._capture(rows, block_out=False)["x"].to(torch.float32))
            keys.append(torch.stack([self._query(x, rows.score.to(x)), self._query(x, rows.attn.to(x))], dim=1))
        return torch.cat(keys)

    @torch.no_grad()
    def _refresh_threshold(self, g: int) -> None:
        """Memory g's threshold: act_ratio times the smallest score of its own edits, on the
        prompt alone (what generation sees) and on prompt + target (teacher forcing). Only the
        memory an edit trained (or a merge rewrote) changes, so only its threshold is refreshed."""
        how = self.config.score_reduce
        own = [i for i, e in enumerate(self.edits) if e["memory"] == g]
        lowest = float("inf")
        self._edit_inputs(own)
        for i in own:
            x, _, p, t = self._xcache[i]
            norms = F.linear(x, self.memories[g]).norm(dim=-1)[None]
            for span in (p, p + t):
                w = torch.zeros_like(norms)
                w[:, :span] = 1.0
                lowest = min(lowest, float(reduce_scores(norms, w, how)))
        self.thresholds[g] = self.config.act_ratio * lowest if own else float("inf")
        self.changes.mark("thresholds")
        self._route = None

    def _end_shard(self) -> None:
        cfg = self.config
        self.shards += 1
        self.shard_edits = 0
        self.mask = None  # the next edit draws a fresh mask
        if cfg.mode == "retrieve":
            self.memories.finish()
            self._append_row("keys", 0.0)
            self._append_row("thresholds", float("inf"))
            self._index = None
            if cfg.retrieve_merge_every and self.shards % cfg.retrieve_merge_every == 0:
                self._merge_memories(cfg.retrieve_merge_every)
            return
        current = self.memories[0]
        self.pending.append(current - self.shard_base)
        if len(self.pending) >= cfg.merge_every:
            merged = self._ties(self.pending, self.merge_base)
            self.memories.set_current(merged)
            self.merge_base = merged.clone()
            self.pending = []
            self.changes.mark("merge_base")
        self.shard_base = self.memories[0].clone()
        self.changes.mark("shard_base")

    def _append_row(self, name: str, fill: float | torch.Tensor) -> None:
        """Append one row, filled with `fill` (a number, or the row itself), to tensor attribute
        `name` (keys, thresholds, edit_keys), into spare capacity: a new memory or edit costs the
        same however many came before it."""
        t = getattr(self, name)
        row = fill.to(t) if torch.is_tensor(fill) else t.new_full((1,) + tuple(t.shape[1:]), fill)
        grown, self._buffers[name] = appended(t, self._buffers.get(name), row)
        setattr(self, name, grown)

    def _merge_memories(self, k: int) -> None:
        """WISE-Retrieve: TIES-merge the last k finished memories (one per shard, each a change
        from the main memory) into one retrievable memory; its edits move to it and its threshold
        is recomputed from the merged weights on all of them (the paper keeps the shards' lowest) by
        apply(), whose edit ended the last of those shards."""
        cur = len(self.memories) - 1  # the fresh memory the next edit trains
        lo = cur - k
        merged = self._ties([self.memories[m] for m in range(lo, cur)], torch.zeros(self.shape, device=self.device))
        self.memories.replace_last(k, merged)
        key = self.keys[lo:cur].sum(0)
        # in place, then drop the k - 1 freed rows at the end: the rows before lo are not copied
        for name, row in (("keys", key), ("thresholds", self.thresholds[lo].clone())):
            t = getattr(self, name)
            t[lo] = row
            t[lo + 1] = t[cur]
            setattr(self, name, t[: lo + 2])
            self.changes.mark(name, lo)
        first = None
        for i, e in enumerate(self.edits):
            if e["memory"] >= lo + 1:
                e["memory"] = lo if e["memory"] < cur else e["memory"] - (k - 1)
                first = i if first is None else first
        if first is not None:
            self.changes.mark("edits", first)
        self._index = None
        self._edit_memory = None

    def _ties(self, deltas: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
        """`base` plus the TIES merge of shard changes, within the norm constraint."""
        cfg = self.config
        return (base + ties_merge(deltas, cfg.ties_density)).clamp(-cfg.norm_constraint, cfg.norm_constraint)
