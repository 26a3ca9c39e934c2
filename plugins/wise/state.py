"""WISE state: saving and restoring everything an editor learnt."""

from __future__ import annotations

from typing import Any

import torch

from editkit.errors import WorkspaceError

STATE_FORMAT = 2  # 2: finished memories packed (MemoryBank); 1 (a dense stack, `memories`) is still read
# how subject keys are taken; keys saved under another rule are recomputed on load
# ("no-sink": a subject ending on an attention sink, routing.sink_tokens, has none)
SUBJECT_KEY_RULE = "no-sink"


class StateIO:
    """The WISEEditor's state_dict / load_state_dict (a mixin: the state lives on the editor)."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {**self.memories.tensors(), "thresholds": self.thresholds, "keys": self.keys,
                   "edit_keys": self.edit_keys, "subject_keys": self.subject_keys, "subject_known": self.subject_known,
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
                "contexts": self.contexts, "subject_block": self.subject_block,
                "subject_key_rule": SUBJECT_KEY_RULE, "subject_norm": self.subject_norm}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        out_f, in_f = self.shape
        problems = []
        fmt = meta.get("format")
        if fmt not in (1, STATE_FORMAT):
            problems.append(f"format {fmt}")
        if meta.get("layer") != self.layer or list(meta.get("shape", [])) != [out_f, in_f]:
            problems.append(f"layer {meta.get('layer')} shape {meta.get('shape')}")
        if meta.get("mode") != self.config.mode:
            problems.append(f"mode {meta.get('mode')}")
        g = None  # the number of memories, once their tensors fit
        if fmt == 1:
            mem = tensors.get("memories")
            if mem is None or mem.dim() != 3 or tuple(mem.shape[1:]) != (out_f, in_f):
                problems.append(f"memories {None if mem is None else tuple(mem.shape)}")
            else:
                g = mem.shape[0]
        elif fmt == STATE_FORMAT:
            found = self.memories.problems(tensors)
            problems += found
            g = None if found else tensors["packed_bits"].shape[0] + 1
        if g is not None:
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
            if "edit_keys" in tensors and tuple(tensors["edit_keys"].shape) != (len(meta.get("edits", [])), 2, in_f):
                problems.append("edit_keys shape")
            n, hidden = len(meta.get("edits", [])), self.adapter.hidden_size
            if ("subject_keys" in tensors) != ("subject_known" in tensors) or "subject_keys" in tensors and (
                    tuple(tensors["subject_keys"].shape) != (n, hidden) or tuple(tensors["subject_known"].shape) != (n,)):
                problems.append("subject_keys shape")
            if any(not 0 <= e.get("memory", -1) < g for e in meta.get("edits", [])):
                problems.append("edit memory index")
        if problems:
            raise WorkspaceError("wise state does not fit this model/config: " + ", ".join(problems))
        self._reset()
        put = dict(device=self.device, dtype=torch.float32)
        if fmt == 1:
            self.memories.load_dense(tensors["memories"])
        else:
            self.memories.load(tensors)
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
        if "edit_keys" in tensors:
            self.edit_keys = tensors["edit_keys"].to(**put).clone()
        elif self.edits:  # saved before edits had keys: the same keys, from their prompts
            self.edit_keys = self._edit_keys_of(self.edits)
        if ("subject_keys" in tensors and meta.get("subject_block") == self.subject_block
                and meta.get("subject_key_rule") == SUBJECT_KEY_RULE):
            self.subject_keys = tensors["subject_keys"].to(**put).clone()
            self.subject_known = tensors["subject_known"].to(self.device, torch.bool).clone()
            self.subject_norm = meta.get("subject_norm")
        elif self.edits:  # saved before subject keys, under another rule, or read at another block:
            # from the edits' prompts and subjects (edits saved before subjects were kept have none)
            self.subject_keys, self.subject_known = self._subject_keys_of(self.edits)
