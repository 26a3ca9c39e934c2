"""GRACE: a codebook at one layer. Each entry holds a key (the layer's input at the last
prompt token of an edit), a value (trained so that replacing the layer's output with it makes
the model produce the edit's target) and a deferral radius. At inference every position's
layer input is compared with the keys; where the nearest key lies within its radius, the
layer's output at that position is replaced by the key's value. Everything else runs
untouched, which gives GRACE its near-perfect locality (and its weak generalization: a
rephrasing rarely lands inside the radius).

Codebook maintenance follows the paper: a new key far from every entry is added with the
initial radius; near an entry with the same target the entry's radius expands to cover it; near
an entry with a different target both radii shrink to half the distance (split). A key that is
practically identical to an existing one (the same prompt edited again) overwrites that entry.

The codebook lives in a forward hook at a Site resolved by the adapter; the model's weights are
never written, so detach() leaves the model bit-identical."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from editkit.components import Editor
from editkit.errors import WorkspaceError
from editkit.scoring import normalise
from editkit.schemas import EditRequest
from editkit.search import faiss
from editkit.sites import Site
from editkit.tokens import IGNORE, shifted_loss, teacher_forced_batch
from editkit.training import minimise

from .config import GraceConfig

STATE_FORMAT = 1


class GraceEditor(Editor):
    name = "grace"
    Config = GraceConfig
    description = "GRACE codebook of (key, value, radius) at one layer (Hartvigsen et al. 2023)"
    tracks_changes = True  # entries are appended; an edit rewrites at most two existing rows
    export_refusal = ("GRACE replaces a layer's output only where the input falls inside a codebook key's "
                      "radius; a checkpoint cannot look keys up, so the codebook would be lost")

    def attach(self) -> None:
        cfg = self.config
        self.layer = self.adapter.layer_index(cfg.layer)
        self.site = Site(cfg.component, self.layer)
        module = self.adapter.module(self.site)
        if cfg.component == "mlp.down":
            self.key_dim, self.value_dim = self.adapter.linear_features(self.site)
        else:
            self.key_dim = self.value_dim = self.adapter.hidden_size
        device = self.adapter.device(self.site)
        self.device = device
        self.keys = torch.zeros((0, self.key_dim), dtype=torch.float32, device=device)
        self.values = torch.zeros((0, self.value_dim), dtype=torch.float32, device=device)
        self.radii = torch.zeros((0,), dtype=torch.float32, device=device)
        self.labels: list[str] = []
        self._index = None  # faiss index over the keys, rebuilt lazily after a change
        self._capture: dict | None = None
        self._train: tuple[int, torch.Tensor] | None = None
        self.hook(module, self._hook, with_kwargs=True)
        self.attached = True

    # ---- the hook ----------------------------------------------------------------------
    def _hook(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        if self._capture is not None:
            self._capture.update(x=x.detach(), out=out.detach())
        new = out
        if len(self.labels):
            index, hit = self._nearest(x)
            if bool(hit.any()):
                new = torch.where(hit.unsqueeze(-1), self.values[index].to(out.dtype), out)
        if self._train is not None:
            pos, value = self._train
            new = new.clone()
            new[:, pos] = value.to(new.dtype)
        if new is out:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    def _nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position of x (..., key_dim): index of the nearest key, and whether it lies within
        that key's radius."""
        flat = x.detach().reshape(-1, x.shape[-1]).to(self.keys.device, torch.float32)
        if len(self.labels) >= self.config.faiss_min_keys and faiss() is not None:
            dist, index = self._faiss_search(flat)
        else:
            dist, index = torch.cdist(flat, self.keys, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
        hit = dist <= self.radii[index]
        shape = x.shape[:-1]
        return index.reshape(shape).to(x.device), hit.reshape(shape).to(x.device)

    def _faiss_search(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._index is None:
            self._index = faiss().IndexFlatL2(self.key_dim)
            self._index.add(np.ascontiguousarray(self.keys.cpu().numpy()))
        d2, idx = self._index.search(np.ascontiguousarray(flat.cpu().numpy()), 1)
        dist = torch.from_numpy(d2[:, 0]).clamp_min(0).sqrt().to(flat.device)
        return dist, torch.from_numpy(idx[:, 0]).long().to(flat.device)

    # ---- editing -----------------------------------------------------------------------
    def apply(self, request: EditRequest) -> dict[str, Any]:
        cfg = self.config
        batch = teacher_forced_batch(self.tokenizer, [request.prompt], [request.target_new]).to(self.loaded.device)
        pos = int((batch.labels[0] != IGNORE).nonzero()[0]) - 1  # the last prompt token
        self._capture = {}
        try:
            with torch.no_grad():
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            key = self._capture["x"][0, pos].to(self.keys.device, torch.float32)
            start_value = self._capture["out"][0, pos].to(self.keys.device, torch.float32)
        finally:
            self._capture = None

        label = normalise(request.target_new)
        radius = cfg.epsilon * float(key.norm())
        action, entry = "add", None
        if len(self.labels):
            dist, nearest = torch.cdist(key[None], self.keys, compute_mode="donot_use_mm_for_euclid_dist")[0].min(0)
            d, j = float(dist), int(nearest)
            if d <= cfg.duplicate_fraction * float(key.norm()):
                action, entry = "overwrite", j
            elif d <= float(self.radii[j]) + radius:
                if self.labels[j] == label:
                    action, entry = "expand", j
                else:
                    action = "split"
        # Plan the codebook change; commit it only after training succeeds.
        keys, values, radii, labels = self.keys, self.values, self.radii.clone(), list(self.labels)
        if action == "add" or action == "split":
            if action == "split":
                radii[j] = d / 2
                radius = d / 2
            keys = torch.cat([keys, key[None]])
            values = torch.cat([values, start_value[None]])
            radii = torch.cat([radii, torch.tensor([radius], device=radii.device)])
            labels.append(label)
            entry = len(labels) - 1
        elif action == "expand":
            radii[entry] = max(float(radii[entry]), d)
        else:  # overwrite: same input, newest target wins
            values = values.clone()
            values[entry] = start_value
            labels[entry] = label

        value = values[entry].detach().clone().requires_grad_(True)
        old = (self.keys, self.values, self.radii, self.labels)
        # Train with the other entries in force (their radii as planned), the new value at `pos`.
        self.keys, self.values, self.radii, self.labels = keys, values.detach(), radii, labels
        self._index = None
        self._train = (pos, value)

        def loss():
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return shifted_loss(logits, batch.labels)

        try:
            loss_value, steps = minimise([value], loss, steps=cfg.steps, lr=cfg.lr,
                                         early_stop_loss=cfg.early_stop_loss)
        except BaseException:
            self.keys, self.values, self.radii, self.labels = old
            self._index = None
            raise
        finally:
            self._train = None
        values = values.detach().clone()
        values[entry] = value.detach()
        self.values = values
        # What changed in existing rows (appended rows need no mark): see StateChanges.
        self.changes.mark("values", entry, entry + 1)
        if action in ("expand", "split"):
            self.changes.mark("radii", j, j + 1)
        if action == "overwrite":
            self.changes.mark("labels", entry, entry + 1)
        return {"loss": loss_value, "steps": steps, "action": action, "entry": entry,
                "radius": float(self.radii[entry]), "codebook_size": len(self.labels)}

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({"keys": self.keys, "values": self.values, "radii": self.radii},
                {"format": STATE_FORMAT, "layer": self.layer, "component": self.config.component,
                 "labels": list(self.labels)})

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        keys, values, radii = tensors.get("keys"), tensors.get("values"), tensors.get("radii")
        labels = meta.get("labels")
        ok = (keys is not None and values is not None and radii is not None and isinstance(labels, list)
              and meta.get("format") == STATE_FORMAT and meta.get("layer") == self.layer
              and meta.get("component") == self.config.component
              and keys.dim() == 2 and keys.shape[1] == self.key_dim
              and values.dim() == 2 and values.shape[1] == self.value_dim
              and radii.dim() == 1 and keys.shape[0] == values.shape[0] == radii.shape[0] == len(labels))
        if not ok:
            raise WorkspaceError(
                f"grace state does not fit this model/config (layer {meta.get('layer')}, component "
                f"{meta.get('component')}, keys {None if keys is None else tuple(keys.shape)}, "
                f"values {None if values is None else tuple(values.shape)})")
        self.keys = keys.to(self.device, torch.float32).clone()
        self.values = values.to(self.device, torch.float32).clone()
        self.radii = radii.to(self.device, torch.float32).clone()
        self.labels = [str(label) for label in labels]
        self._index = None
