"""One edit's write problem, seen from the written layer: the base stream, where the slot is
read, and how a batch of candidate values scores (loss, margin, lens gradients)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .editor import NMCEditor
    from .memory import Entry


@dataclass
class Scored:
    loss: torch.Tensor  # (m,) mean target cross-entropy per candidate
    margin: torch.Tensor  # (m,) smallest (target logit - best other logit) over target tokens
    lens_first: torch.Tensor  # (m, H)
    lens_mean: torch.Tensor  # (m, H)


class EditProblem:
    """One edit's write, seen from the written layer: base stream, where the slot is read, and
    how a batch of candidate values scores (loss, margin, lens gradients)."""

    def __init__(self, editor: "NMCEditor", hidden: torch.Tensor, read_mask: torch.Tensor, positions: torch.Tensor,
                 targets: torch.Tensor, entry: "Entry"):
        self.editor, self.hidden, self.read_mask = editor, hidden, read_mask  # (T, H), (T,)
        self.positions, self.targets = positions, targets  # (n,) positions predicting (n,) target ids
        self.entry = entry  # the slot the value is written into (its value still zero)
        self.key = entry.key  # (H,) unit prompt key
        self.state = hidden[positions[0]].to(torch.float32)  # (H,) written block's output at the key
        # cost counters: candidate rows run through the blocks above, and backward passes
        self.forward_rows, self.backward_passes = 0, 0

    def stream(self, values: torch.Tensor) -> torch.Tensor:
        """(m, H) candidate values -> (m, T, H) stream leaving the written block."""
        add = self.read_mask[None, :, None] * values[:, None, :]
        return self.hidden[None].to(torch.float32) + add

    def score(self, values: torch.Tensor, need_graph: bool = False) -> tuple[Scored, torch.Tensor]:
        """Scores of candidate values; also returns the mean loss over candidates (with a graph
        back to `values` when need_graph) for true gradients."""
        ed = self.editor
        m = values.shape[0]
        self.forward_rows += m
        stream = self.stream(values).to(self.hidden.dtype)
        attn = torch.ones(stream.shape[:2], dtype=torch.long, device=stream.device)
        normed = ed.adapter.run_blocks(stream, ed.layer + 1, attention_mask=attn)[:, self.positions]
        lens_in = normed if need_graph else normed.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = ed.adapter.unembed(lens_in).float()  # (m, n, V)
            ce = F.cross_entropy(logits.flatten(0, 1), self.targets.repeat(m), reduction="none").view(m, -1)
            loss = ce.mean(dim=1)
            # Per-position lens gradients: d CE_t / d normed_t, one position each.
            lens = torch.autograd.grad(ce.sum(), lens_in, retain_graph=need_graph)[0].float()
        tgt = logits.gather(-1, self.targets.view(1, -1, 1).expand(m, -1, 1)).squeeze(-1)
        other = logits.scatter(-1, self.targets.view(1, -1, 1).expand(m, -1, 1), float("-inf")).amax(-1)
        scored = Scored(loss.detach(), (tgt - other).amin(dim=1).detach(), lens[:, 0].detach(),
                        lens.mean(dim=1).detach())
        return scored, loss.sum()
