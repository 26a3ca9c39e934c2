"""Editing features of one turn: at every edited linear module, its input (the key) and the
gradient of the target loss at its output (the value gradient), at the positions that
predict target tokens, from one forward and one backward pass of the model.

The loss is the summed (not averaged) cross-entropy of the target tokens, so a token's
gradient does not depend on how many other requests share its turn or its batch: turns of
1, 10 or 100 requests give features on the same scale and feed the same running statistics.
Only the states at the target positions go through the vocabulary projection, not every
position of the batch (editkit.forward.unembed_inputs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from editkit.forward import unembed_inputs
from editkit.sites import Site
from editkit.tokens import IGNORE, teacher_forced_batch


@dataclass
class Features:
    keys: list[torch.Tensor]  # per module (n, in_features), float32 on the module's device
    grads: list[torch.Tensor]  # per module (n, out_features)
    rows: torch.Tensor  # (n,) request index of each feature row
    losses: list[float]  # per request: mean target cross-entropy before the shift


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, positions, target ids) of every position whose next token is a target token."""
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows, cols, labels[rows, cols + 1]


class Capture:
    """Forward hooks that record each module's input and give its output a zero-valued leaf,
    whose gradient is the gradient at the module output."""

    def __init__(self, modules: list[nn.Module]):
        self.inputs: list[torch.Tensor | None] = [None] * len(modules)
        self.leaves: list[torch.Tensor | None] = [None] * len(modules)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int):
        def hook(module, args, output):
            self.inputs[i] = args[0].detach()
            leaf = torch.zeros_like(output, requires_grad=True)
            self.leaves[i] = leaf
            return output + leaf
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def capture_features(loaded, sites: list[Site], prompts: list[str], targets: list[str],
                     batch_size: int) -> Features:
    """Keys and value gradients of every (prompt, target) at every site, `batch_size` rows per
    forward/backward pass (the loss is a sum, so the split does not change the features)."""
    adapter = loaded.adapter
    modules = [adapter.module(site) for site in sites]
    keys: list[list[torch.Tensor]] = [[] for _ in sites]
    grads: list[list[torch.Tensor]] = [[] for _ in sites]
    rows_all, losses = [], []
    for start in range(0, len(prompts), batch_size):
        batch = teacher_forced_batch(loaded.tokenizer, prompts[start:start + batch_size],
                                     targets[start:start + batch_size]).to(loaded.device)
        rows, cols, ids = target_positions(batch.labels)
        capture = Capture(modules)
        try:
            with torch.enable_grad():
                hidden = unembed_inputs(loaded, batch.input_ids, batch.attention_mask)
                logits = adapter.unembed(hidden[rows, cols]).float()
                token_loss = F.cross_entropy(logits, ids.to(logits.device), reduction="none")
                token_loss.sum().backward()
        finally:
            capture.remove()
        for i in range(len(sites)):
            at = (rows.to(capture.inputs[i].device), cols.to(capture.inputs[i].device))
            keys[i].append(capture.inputs[i][at].float())
            grads[i].append(capture.leaves[i].grad[at].float())
        token_loss = token_loss.detach().cpu()
        rows_cpu = rows.cpu()
        for r in range(batch.input_ids.shape[0]):
            losses.append(float(token_loss[rows_cpu == r].mean()))
        rows_all.append(rows_cpu + start)
    return Features([torch.cat(k) for k in keys], [torch.cat(g) for g in grads], torch.cat(rows_all), losses)
