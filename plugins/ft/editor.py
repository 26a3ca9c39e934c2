"""FT-L: fine-tune one MLP down-projection on the edit's target tokens, the change kept
inside an L-infinity ball around the original weight. The change lives in a separate delta
applied by a forward hook, so the base weights are never written and detaching is exact."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from editkit.components import Editor
from editkit.errors import WorkspaceError
from editkit.schemas import EditRequest
from editkit.sites import Site
from editkit.tokens import shifted_loss, teacher_forced_batch
from editkit.training import minimise

from .config import FTConfig


class FTEditor(Editor):
    name = "ft"
    Config = FTConfig
    description = "Constrained fine-tuning of one MLP down-projection (FT-L baseline)"

    def attach(self) -> None:
        self.site = Site("mlp.down", self.config.layer)
        self.layer = self.adapter.layer_index(self.config.layer)
        module = self.adapter.module(self.site)
        in_f, out_f = self.adapter.linear_features(self.site)  # (out, in), whatever the storage orientation
        self.delta = torch.zeros((out_f, in_f), dtype=torch.float32, device=self.adapter.device(self.site))
        self.hook(module, self._add_delta)
        self.attached = True

    def _add_delta(self, module, inputs, output):
        x = inputs[0]
        return output + F.linear(x.to(self.delta.dtype), self.delta).to(output.dtype)

    def folded_weights(self) -> dict[str, torch.Tensor]:
        """FT-L adds delta x to the down-projection's output: its weight plus delta."""
        from editkit.export import parameter_name

        module = self.adapter.module(self.site)
        weight = self.adapter.weight_values(self.site)
        new = self.adapter.stored(self.site, weight.to(torch.float32) + self.delta.detach().to(weight.device))
        return {parameter_name(self.model, module.weight): new.to(module.weight.dtype)}

    def apply(self, request: EditRequest) -> dict[str, Any]:
        cfg = self.config
        batch = teacher_forced_batch(self.tokenizer, [request.prompt], [request.target_new]).to(self.loaded.device)
        start = self.delta.detach().clone()
        self.delta.requires_grad_(True)

        def loss():
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return shifted_loss(logits, batch.labels)

        def constrain():  # the norm constraint bounds the total change
            self.delta.clamp_(-cfg.norm_constraint, cfg.norm_constraint)

        try:
            loss_value, steps = minimise([self.delta], loss, steps=cfg.steps, lr=cfg.lr,
                                         early_stop_loss=cfg.early_stop_loss, after_step=constrain)
        finally:
            self.delta.requires_grad_(False)
            self.delta.grad = None
        return {"loss": loss_value, "steps": steps,
                "delta_change": float((self.delta - start).abs().max())}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"delta": self.delta}, {"layer": self.layer, "format": 1}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        delta = tensors.get("delta")
        if delta is None or tuple(delta.shape) != tuple(self.delta.shape) or meta.get("layer") != self.layer:
            raise WorkspaceError(f"ft state does not fit this model/config (layer {meta.get('layer')}, "
                                 f"shape {None if delta is None else tuple(delta.shape)})")
        self.delta.copy_(delta.to(self.delta.device, self.delta.dtype))
