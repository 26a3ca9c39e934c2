"""The neural memory controller editor: a key-value memory written by fast synthetic-gradient
steps and refined by slow true-gradient steps.

Reading (every forward pass): the output of block `key_layer` gives each position two queries,
its own standardised state (matched against the slots' subject keys) and the running mean of
the standardised states up to it (the prompt's content, matched against the slots' prompt
keys); the sequence's first token, an attention sink, and padding are left out. Once a token
has matched a slot's subject, that slot's value is added to the output of block `layer` from
there on, through a gate that is 0 below the deferral threshold, so inputs about other subjects
run unchanged (memory.Memory.address). Running sums and the best subject matches continue
across KV-cached generation steps; per-call state is thread-local so concurrent generations do
not mix.

Writing one edit: one forward pass, stopped at `layer`, gives the queries and the written
block's output. The controller picks the slot (memory.rule_controller, or the learned
controller.learned_controller with controller=learned). The loss of a value v is the
target cross-entropy of running only the blocks above with v added wherever the planned memory
reads that slot; several candidate values are scored in one batch. Fast steps move v along the
synthetic gradient with a line search (no backward pass through the model); if the margin is
still missed, slow Adam steps use the true gradient, and each true gradient is a regression
target that trains the synthetic-gradient module. The memory changes only once the write is
done, so a failed edit leaves it as it was."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from editkit.components import Editor
from editkit.errors import InvalidRequest, WorkspaceError
from editkit.scoring import normalise
from editkit.forward import call_context
from editkit.schemas import EditRequest
from editkit.sites import Site
from editkit.tokens import canonical_ids, teacher_forced_batch, token_span

from .config import NMCConfig
from .feedback import SyntheticGradient, load_feedback
from .controller import learned_controller, load_controller
from .memory import Entry, Memory, WritePlan, rule_controller, with_slot, write_slot
from .problem import EditProblem
from .write import Writing

STATE_FORMAT = 2  # 2: slots keyed by subject as well as by prompt


class NMCEditor(Writing, Editor):
    name = "nmc"
    Config = NMCConfig
    description = "Neural memory controller: key-value memory written by synthetic-gradient fast steps, refined by true-gradient slow steps"
    tracks_changes = True  # an edit writes one slot's rows, the usage vector and the feedback module
    export_refusal = ("NMC reads a key-value memory addressed by the edit's subject at inference; a "
                      "checkpoint cannot address it, so the memory would be lost")

    # ---- attach / detach ---------------------------------------------------------------
    def attach(self) -> None:
        cfg = self.config
        self.layer = self.adapter.layer_index(cfg.layer)
        self.key_layer = self.adapter.layer_index(cfg.key_layer)
        if self.key_layer > self.layer:
            raise InvalidRequest(f"nmc: key_layer ({self.key_layer}) must not come after layer ({self.layer})")
        self.hidden = self.adapter.hidden_size
        blocks = self.adapter.blocks()
        self.device = self.adapter.device(Site("block", self.layer))
        self.memory = Memory.empty(self.hidden, self.device)
        self.canon = canonical_ids(self.tokenizer).to(self.device)
        self.feedback = SyntheticGradient(self.hidden, cfg.feedback_hidden).to(self.device)
        self.controller = load_controller(cfg.controller_file, self.device) if cfg.controller == "learned" else None
        self._local = threading.local()
        self.hook(self.model, self._model_pre_hook, pre=True, with_kwargs=True)
        self.hook(blocks[self.key_layer], self._key_hook)
        self.hook(blocks[self.layer], self._write_hook)
        self.attached = True
        try:
            self._statistics()
            if cfg.feedback:
                self.load_feedback(cfg.feedback)
        except BaseException:
            self.detach()
            raise

    def feedback_info(self) -> dict[str, Any]:
        return {"layer": self.layer, "key_layer": self.key_layer, "model": self.loaded.fingerprint}

    def load_feedback(self, path) -> None:
        """Replace the synthetic-gradient module with one saved by `editkit nmc pretrain`."""
        tensors, doc = load_feedback(path)
        want = {**self.feedback.describe(), "key_layer": self.key_layer}
        bad = {k: (doc.get(k), v) for k, v in want.items() if doc.get(k) != v}
        layers = doc.get("layers") or [doc.get("layer")]  # a shared module serves several layers
        if self.layer not in layers:
            bad["layer"] = (layers[0] if len(layers) == 1 else layers, self.layer)
        if bad:
            detail = ", ".join(f"{k}: file {a}, here {b}" for k, (a, b) in bad.items())
            raise InvalidRequest(f"synthetic-gradient file {path} does not fit this model/config ({detail})")
        self._load_feedback_tensors(tensors, str(path))

    def _load_feedback_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        own = self.feedback.state_dict()
        if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
            raise WorkspaceError(f"{where}: synthetic-gradient tensors do not match the module's shapes")
        self.feedback.load_state_dict({k: v.to(self.device, torch.float32) for k, v in tensors.items()})

    # ---- statistics of the model, from a fixed pool of ordinary text ------------------------
    @torch.no_grad()
    def _statistics(self) -> None:
        """Per-dimension mean and spread of the key layer's states (queries are standardised
        with them, so a few huge dimensions do not decide every similarity) and the typical
        norm of the written layer's states (the unit of step sizes and learning rates)."""
        from editkit.unrelated import UNRELATED

        tok = self.tokenizer
        enc = tok(list(UNRELATED), return_tensors="pt", padding=True)
        ids, attn = enc.input_ids.to(self.loaded.device), enc.attention_mask.to(self.loaded.device)
        seen = self._unedited(ids, attn)
        keep = attn.bool().clone()
        keep[torch.arange(len(keep)), attn.argmax(dim=1)] = False  # each text's first token
        keys = seen["key"][keep].float()
        self.key_mean = keys.mean(dim=0)
        self.key_std = keys.std(dim=0).clamp_min(1e-3 * float(keys.std(dim=0).mean()) + 1e-12)
        self.scale = float(seen["write"][keep].float().norm(dim=-1).median())
        self.pool = F.normalize((keys - self.key_mean) / self.key_std, dim=-1)  # ordinary text's tokens

    # ---- hooks -------------------------------------------------------------------------
    def _model_pre_hook(self, module, args, kwargs):
        self._local.call = call_context(args, kwargs)
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        self._local.ids = self.canonical(ids) if torch.is_tensor(ids) and ids.dim() == 2 else None  # None: embeddings

    def canonical(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> canonical ids (one per spelling up to spaces and case; ids beyond the
        tokenizer's vocabulary stand for themselves)."""
        ids = ids.to(self.canon.device)
        inside = ids < len(self.canon)
        return torch.where(inside, self.canon[ids.clamp(0, len(self.canon) - 1)], ids)

    def _key_hook(self, module, args, output):
        st = self._local
        if getattr(st, "bypass", False) or not len(self.memory):
            return None
        st.query = self._queries(output[0] if isinstance(output, tuple) else output)
        return None

    def _queries(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, t, H) states of the key block -> (B, t, H) unit token queries and (B, t, H) unit
        context queries, the running mean up to each position (both zero where not counted)."""
        st = self._local
        mask, past = getattr(st, "call", (None, 0))
        b, t = h.shape[:2]
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] >= t:
            full = mask.to(torch.float32)
            valid = full[:, -t:]
            first = ((full.cumsum(dim=1) == 1) & (full > 0))[:, -t:].to(torch.float32)
        else:
            valid = torch.ones((b, t), device=h.device)
            first = torch.zeros((b, t), device=h.device)
            if past == 0:
                first[:, 0] = 1.0
        weight = (valid * (1.0 - first)).unsqueeze(-1)
        z = (h.to(torch.float32) - self.key_mean) / self.key_std
        sums = (z * weight).cumsum(dim=1)
        counts = weight.cumsum(dim=1)
        carried = getattr(st, "sums", None)
        if past > 0 and carried is not None and carried[0].shape[0] == b:
            sums = sums + carried[0].unsqueeze(1)
            counts = counts + carried[1].unsqueeze(1)
        st.sums = (sums[:, -1], counts[:, -1])
        return F.normalize(z * weight, dim=-1), F.normalize(sums / counts.clamp_min(1.0), dim=-1)

    def _write_hook(self, module, args, output):
        st = self._local
        if getattr(st, "bypass", False) or not len(self.memory):
            return None
        out = output[0] if isinstance(output, tuple) else output
        cfg = self.config
        _, past = getattr(st, "call", (None, 0))
        carried = getattr(st, "carried", None)
        if past == 0 or carried is None or carried[0].shape != (out.shape[0], len(self.memory)):
            carried = None
        ids = st.ids if st.ids is not None and st.ids.shape == out.shape[:2] else None
        add, st.carried = self.memory.read(*st.query, ids, cfg.threshold, cfg.gate_width, carried)
        new = out + add.to(out.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    # ---- editing -----------------------------------------------------------------------
    def apply(self, request: EditRequest) -> dict[str, Any]:
        cfg = self.config
        label = normalise(request.target_new)
        problem, plan = self.plan(request, label)
        saved = {k: v.detach().clone() for k, v in self.feedback.state_dict().items()}
        try:
            value, stats = self.write(problem, plan.start)
        except BaseException:
            self.feedback.load_state_dict(saved)
            raise
        action = plan.action
        held_already = stats["steps"] == 0 and stats["absorbed"] and not bool(plan.start.any())
        if held_already and action in ("new", "evict"):
            action = "none"  # the model already gives this answer: no slot spent on it
        elif held_already and action == "rewrite":
            action = "erase"  # back to the model's own answer: the slot keeps the fact with no value
        if action != "none":
            entry = replace(problem.entry, value=value)
            self.memory = write_slot(self.memory, plan.slot, entry, cfg.usage_decay,
                                     new_occupant=action in ("evict", "erase"))
            if action == "erase":
                self.memory.usage[plan.slot] = 0.0  # reused first
            for name in ("keys", "subjects", "names", "leads", "values", "ends", "labels"):
                self.changes.mark(name, plan.slot, plan.slot + 1)
            self.changes.mark("usage")  # every count decays
        for name in self.feedback.state_dict():  # slow steps train the module
            self.changes.mark(f"feedback.{name}")
        stats.update(slot=plan.slot, action=action, memory_size=len(self.memory))
        if plan.evicted is not None and action == "evict":
            stats["evicted"] = plan.evicted
        return stats

    def plan(self, request: EditRequest, label: str) -> tuple[EditProblem, WritePlan]:
        """The controller's decision for `request` and the write problem it poses."""
        cfg = self.config
        batch = teacher_forced_batch(self.tokenizer, [request.prompt], [request.target_new]).to(self.loaded.device)
        pos = int(batch.attention_mask[0].sum()) - len(batch.target_ids[0]) - 1  # last prompt token
        ids = batch.input_ids
        hidden, tokens, context = self._capture(ids, batch.attention_mask)
        canon = self.canonical(ids[0])
        at, lead = self.subject_position(request, tokens[:pos + 1])
        lead_id = int(canon[lead]) if lead is not None else -1
        key, subject = context[pos].clone(), tokens[at].clone()
        entry = Entry(key, subject, int(canon[at]), lead_id, torch.zeros_like(key),
                      int(canon[pos + len(batch.target_ids[0])]), label)
        if self.controller is None:
            plan = rule_controller(self.memory, key, subject, label, cfg.slots, cfg.match_threshold, cfg.match_context)
        else:
            plan = learned_controller(self.controller, self.memory, key, subject, entry.name, entry.lead, label,
                                      cfg.slots, self.current_read(tokens, context, canon, pos))
        problem = self._problem(plan, entry, canon, hidden, tokens, context, pos, batch.target_ids[0])
        return problem, plan

    @torch.no_grad()
    def current_read(self, tokens: torch.Tensor, context: torch.Tensor, canon: torch.Tensor,
                     pos: int) -> tuple[int, float] | None:
        """The slot the prompt (up to `pos`) reads at its last token now, and the gate (None: none)."""
        if not len(self.memory):
            return None
        cfg = self.config
        index, gate, _ = self.memory.address(tokens[None, :pos + 1], context[None, :pos + 1], canon[None, :pos + 1],
                                             cfg.threshold, cfg.gate_width)
        g = float(gate[0, -1])
        return (int(index[0, -1]), g) if g > 0 else None

    def subject_position(self, request: EditRequest, tokens: torch.Tensor) -> tuple[int, int | None]:
        """The prompt token whose state keys the slot and the one before it whose identity the
        key also needs (None: none). With a subject: its last token, led by its token before
        that (a one-token subject alone); a subject that is the text's first token, which has
        no usable state, keys through the token after it, led by the subject. Without a subject
        (or one not in the prompt), a heuristic stand-in: the prompt token least like any token
        of ordinary text (the most specific word, usually the entity), led by the token before."""
        counted = tokens.norm(dim=-1) > 0
        if request.subject:
            span = token_span(self.tokenizer, request.prompt, request.subject)
            if span is not None and span[1] < len(tokens):
                first, last = span
                if bool(counted[last]):
                    return last, (last - 1 if last > first else None)
                if last + 1 < len(tokens) and bool(counted[last + 1]):
                    return last + 1, last
        typical = (tokens @ self.pool.T).amax(dim=-1).masked_fill(~counted, float("inf"))
        at = int(typical.argmin())
        return at, (at - 1 if at > 0 else None)

    @torch.no_grad()
    def _capture(self, ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(T, H) written block's output without the memory, (T, H) token and (T, H) context
        queries, for one row."""
        seen = self._unedited(ids, attn)
        tokens, context = self._queries(seen["key"])
        return seen["write"][0], tokens[0].detach(), context[0].detach()

    def _unedited(self, ids: torch.Tensor, attn: torch.Tensor) -> dict[str, torch.Tensor]:
        """The key block's and the written block's outputs with the memory inert; the pass
        ends at the written block."""
        st = self._local
        st.bypass = True
        try:
            seen, _ = self.adapter.capture({"input_ids": ids, "attention_mask": attn},
                                           {"key": (Site("block", self.key_layer), "out"),
                                            "write": (Site("block", self.layer), "out")})
        finally:
            st.bypass = False
        return seen

    def _problem(self, plan, entry, ids, hidden, tokens, context, pos, target_ids) -> EditProblem:
        """The planned memory (other slots as they are, the written slot at `key`) read along
        the row: the other slots' contribution goes into the base stream, the written slot's
        gate becomes the read mask of the trained value."""
        cfg = self.config
        # Only slots keyed at one of the prompt's tokens can be read on it (Memory.address): the
        # planned memory is those (less the written slot) and the entry, not a copy of them all.
        near = torch.isin(self.memory.names, ids).nonzero().squeeze(1)
        near = near[near != plan.slot]
        planned = with_slot(self.memory.subset(near), len(near), entry, 1.0)
        index, gate, _ = planned.address(tokens[None], context[None], ids[None], cfg.threshold, cfg.gate_width)
        index, gate = index[0], gate[0]
        own = (index == len(near)).to(torch.float32) * gate
        others = (gate * (index != len(near)).to(torch.float32)).unsqueeze(-1) * planned.values[index]
        base = hidden.to(torch.float32) + others
        n = len(target_ids)
        positions = torch.arange(pos, pos + n, device=hidden.device)
        targets = torch.tensor(target_ids, device=hidden.device)
        return EditProblem(self, base.to(hidden.dtype), own, positions, targets, entry)

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"keys": self.memory.keys, "subjects": self.memory.subjects, "names": self.memory.names,
                   "leads": self.memory.leads,
                   "values": self.memory.values, "ends": self.memory.ends, "usage": self.memory.usage,
                   "key_mean": self.key_mean, "key_std": self.key_std}
        tensors.update({f"feedback.{k}": v.detach().clone() for k, v in self.feedback.state_dict().items()})
        meta = {"format": STATE_FORMAT, "layer": self.layer, "key_layer": self.key_layer, "scale": self.scale,
                "labels": list(self.memory.labels), "feedback": self.feedback.describe()}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        keys, subjects = tensors.get("keys"), tensors.get("subjects")
        names, leads = tensors.get("names"), tensors.get("leads")
        values, ends, usage = tensors.get("values"), tensors.get("ends"), tensors.get("usage")
        mean, std = tensors.get("key_mean"), tensors.get("key_std")
        labels = meta.get("labels")
        h = self.hidden
        ok = (meta.get("format") == STATE_FORMAT and meta.get("layer") == self.layer
              and meta.get("key_layer") == self.key_layer and meta.get("feedback") == self.feedback.describe()
              and isinstance(labels, list) and isinstance(meta.get("scale"), (int, float))
              and all(t is not None for t in (keys, subjects, names, leads, values, ends, usage, mean, std))
              and keys.dim() == 2 and keys.shape[1] == h and values.shape == keys.shape
              and subjects.shape == keys.shape and ends.shape == usage.shape == leads.shape == names.shape
              and not any(t.is_floating_point() for t in (ends, leads, names))
              and usage.shape == (keys.shape[0],) and len(labels) == keys.shape[0]
              and mean.shape == (h,) and std.shape == (h,))
        if not ok:
            raise WorkspaceError(
                f"nmc state does not fit this model/config (layer {meta.get('layer')}, key_layer "
                f"{meta.get('key_layer')}, keys {None if keys is None else tuple(keys.shape)}, hidden {h})")
        feedback = {k[len("feedback."):]: v for k, v in tensors.items() if k.startswith("feedback.")}
        self._load_feedback_tensors(feedback, "nmc state")
        f32 = dict(device=self.device, dtype=torch.float32)
        i64 = dict(device=self.device, dtype=torch.long)
        self.memory = Memory(keys.to(**f32).clone(), subjects.to(**f32).clone(), names.to(**i64).clone(),
                             leads.to(**i64).clone(),
                             values.to(**f32).clone(), ends.to(**i64).clone(), usage.to(**f32).clone(),
                             [str(x) for x in labels])
        self.key_mean, self.key_std = mean.to(**f32).clone(), std.to(**f32).clone()
        self.scale = float(meta["scale"])
