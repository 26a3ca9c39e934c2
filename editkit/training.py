"""The optimisation loop editors share: Adam until the loss is low enough or steps run out."""

from __future__ import annotations

from collections.abc import Callable

import torch


def minimise(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], *, steps: int, lr: float,
             early_stop_loss: float = 0.0, after_step: Callable[[], None] | None = None) -> tuple[float, int]:
    """Minimise `loss_fn()` over `params` (tensors with requires_grad). `after_step` runs
    under no_grad after each update (e.g. to project onto a constraint). Returns the last
    loss seen and the number of steps taken (the step that met the early stop counts)."""
    opt = torch.optim.Adam(params, lr=lr)
    loss_value, taken = float("nan"), 0
    for taken in range(1, steps + 1):
        loss = loss_fn()
        loss_value = loss.item()
        if loss_value < early_stop_loss:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()
    return loss_value, taken
