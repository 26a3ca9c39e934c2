"""UltraEdit: every turn (a batch of edit requests) is one forward/backward pass and one
closed-form solve per edited module; no training loop, no subject position, no side memory.

A turn: collect keys and value gradients at the target-predicting positions of every request
(features.py); merge them into each module's running statistics (statistics.py; lifelong
normalization, seeded with the warm-up rows on an empty state); normalise; solve the ridge
regression for each module's weight shift (solver.py), with earlier edits' keys kept in the
normal equations and inside AlphaEdit's null space where configured (nullspace.py); add the
shifts to the accumulated deltas and write W = W0 + delta into the model. Generation then runs
the plain model: edits cost nothing at inference.

The original weights W0 of the edited modules are kept from attach(); detach() copies them
back, so the model is bit-identical to before attach() (no subtraction of deltas). The state is
the accumulated deltas, the running statistics and the earlier keys' Gram matrices; loading it
writes W0 + delta again, so a reopened or rolled-back workspace has exactly the weights of the
run it records. Nothing here draws random numbers: a turn depends only on the state and its
requests."""

from __future__ import annotations

from typing import Any

import torch

from editkit.components import Editor
from editkit.errors import InvalidRequest, WorkspaceError
from editkit.schemas import EditRequest
from editkit.sites import Site

from .config import UltraEditConfig
from .features import capture_features
from .nullspace import null_space_projection, preserved_second_moments
from .solver import ridge_shift, target_values
from .statistics import RunningStats, tensor_problem
from .warmup import warmup_pairs

STATE_FORMAT = 1


class UltraEditEditor(Editor):
    name = "ultraedit"
    Config = UltraEditConfig
    description = ("UltraEdit: closed-form ridge shifts of a few MLP projections per turn of edits, from "
                   "keys and gradients under lifelong normalization")
    edits_in_turns = True

    # ---- attach / detach ---------------------------------------------------------------
    def attach(self) -> None:
        cfg = self.config
        self.layers = sorted({self.adapter.layer_index(layer) for layer in cfg.layers})
        self.sites = [Site(cfg.component, layer) for layer in self.layers]
        offloaded = [str(site) for site in self.sites if self.adapter.offloaded(site)]
        if offloaded:
            raise InvalidRequest(f"ultraedit writes its shift into the weights of {', '.join(offloaded)}, which a "
                                 "device map offloads here; load those layers onto a device")
        self._weights = [self.adapter.weight(site) for site in self.sites]  # (out, in) views
        self._original = [w.detach().clone() for w in self._weights]
        self.shapes = [tuple(w.shape) for w in self._weights]
        self.deltas = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in self._weights]
        self.stats = [RunningStats.empty(w.shape[1], w.shape[0], cfg.whitening, w.device) for w in self._weights]
        self.grams = [torch.zeros((w.shape[1], w.shape[1]), dtype=torch.float32, device=w.device)
                      for w in self._weights] if cfg.preserve > 0 else None
        self.turns = 0
        self.edits = 0
        self.projections: list[torch.Tensor] | None = None
        if cfg.null_space:  # from the unedited model, which is what attach() always sees
            self.projections = [null_space_projection(m, cfg.null_space_threshold)
                                for m in preserved_second_moments(self.loaded, self.sites)]
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            with torch.no_grad():
                for weight, original in zip(self._weights, self._original):
                    weight.copy_(original)
            self.attached = False

    def folded_weights(self) -> dict[str, torch.Tensor]:
        """The shift is in the model's weights already (W0 + delta): nothing to fold."""
        return {}

    def _write_weights(self) -> None:
        with torch.no_grad():
            for weight, original, delta in zip(self._weights, self._original, self.deltas):
                weight.copy_((original.to(torch.float32) + delta).to(weight.dtype))

    # ---- editing -----------------------------------------------------------------------
    def apply(self, request: EditRequest) -> dict[str, Any]:
        return self.apply_turn([request])[0]

    def apply_turn(self, requests: list[EditRequest]) -> list[dict[str, Any]]:
        """One forward/backward pass over the turn's requests, one solve per module; the
        statistics, Gram matrices, deltas and weights change only once every shift is computed."""
        if not requests:
            return []
        cfg = self.config
        stats = self.stats
        if cfg.warmup and float(stats[0].count) == 0:
            prompts, targets = warmup_pairs()
            warm = capture_features(self.loaded, self.sites, prompts, targets, cfg.batch_size)
            stats = [s.merged(k, g) for s, k, g in zip(stats, warm.keys, warm.grads)]
        feats = capture_features(self.loaded, self.sites, [r.prompt for r in requests],
                                 [r.target_new for r in requests], cfg.batch_size)
        stats = [s.merged(k, g) for s, k, g in zip(stats, feats.keys, feats.grads)]
        deltas, grams, shift_sq = [], [], 0.0
        for i, (s, keys, grads) in enumerate(zip(stats, feats.keys, feats.grads)):
            k_hat, g_hat = s.normalise(keys, grads)
            values = target_values(k_hat, g_hat, cfg.lr)
            prior = None if self.grams is None else cfg.preserve * self.grams[i].to(torch.float64)
            shift = ridge_shift(keys, values, cfg.ridge, None if self.projections is None else self.projections[i],
                                prior)
            shift = shift.to(self.deltas[i].device, torch.float32)
            if not bool(torch.isfinite(shift).all()):
                raise FloatingPointError(f"ultraedit: non-finite shift at {self.sites[i]}")
            shift_sq += float(shift.double().pow(2).sum())
            deltas.append(self.deltas[i] + shift)
            if self.grams is not None:
                k = keys.to(torch.float64)
                grams.append((self.grams[i].to(torch.float64) + k.T @ k).to(torch.float32))
        self.stats, self.deltas = stats, deltas
        if self.grams is not None:
            self.grams = grams
        self.turns += 1
        self.edits += len(requests)
        self._write_weights()
        rows = feats.rows.tolist()
        turn = {"turn": self.turns, "turn_size": len(requests), "shift_norm": shift_sq ** 0.5,
                "delta_norm": self.delta_norm()}
        return [{"loss": loss, "positions": rows.count(j), **turn} for j, loss in enumerate(feats.losses)]

    def delta_norm(self) -> float:
        """Frobenius norm of all accumulated weight deltas together."""
        return float(sum(float(d.double().pow(2).sum()) for d in self.deltas)) ** 0.5

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for i, (delta, stats) in enumerate(zip(self.deltas, self.stats)):
            tensors[f"delta.{i}"] = delta
            tensors.update(stats.tensors(f"stats.{i}"))
            if self.grams is not None:
                tensors[f"gram.{i}"] = self.grams[i]
        meta = {"format": STATE_FORMAT, "component": self.config.component, "layers": list(self.layers),
                "shapes": [list(s) for s in self.shapes], "whitening": self.config.whitening,
                "preserve": self.grams is not None, "turns": self.turns, "edits": self.edits}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        problem = self._state_problem(tensors, meta)
        if problem:
            raise WorkspaceError(f"ultraedit state does not fit this model/config: {problem}")
        devices = [d.device for d in self.deltas]
        self.deltas = [tensors[f"delta.{i}"].to(dev, torch.float32).clone() for i, dev in enumerate(devices)]
        self.stats = [RunningStats.from_tensors(tensors, f"stats.{i}", shape[1], dev)
                      for i, (shape, dev) in enumerate(zip(self.shapes, devices))]
        if self.grams is not None:
            self.grams = [tensors[f"gram.{i}"].to(dev, torch.float32).clone() for i, dev in enumerate(devices)]
        self.turns, self.edits = int(meta["turns"]), int(meta["edits"])
        self._write_weights()

    def _state_problem(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str | None:
        """Why the state cannot be loaded here, or None; checks everything before anything changes."""
        cfg = self.config
        if meta.get("format") != STATE_FORMAT:
            return f"state format {meta.get('format')!r}, expected {STATE_FORMAT}"
        if meta.get("component") != cfg.component or meta.get("layers") != list(self.layers):
            return (f"state is for {meta.get('component')} at layers {meta.get('layers')}, this editor shifts "
                    f"{cfg.component} at layers {self.layers}")
        for key, here in (("whitening", cfg.whitening), ("preserve", self.grams is not None)):
            if meta.get(key) != here:
                return f"state was made with {key}={meta.get(key)}, this editor has {here}"
        for key in ("turns", "edits"):
            if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 0:
                return f"meta '{key}' must be a non-negative integer, got {meta.get(key)!r}"
        expected: set[str] = set()
        for i, (out_f, in_f) in enumerate(self.shapes):
            want = {f"delta.{i}": (out_f, in_f)}
            if self.grams is not None:
                want[f"gram.{i}"] = (in_f, in_f)
            problem = tensor_problem(tensors, want) or RunningStats.check(tensors, f"stats.{i}", in_f, out_f,
                                                                          cfg.whitening)
            if problem:
                return problem
            expected |= set(want) | {f"stats.{i}.{n}" for n in RunningStats.names(cfg.whitening)}
        extra = sorted(set(tensors) - expected)
        if extra:
            return f"unexpected tensors {extra[:3]}"
        return None
