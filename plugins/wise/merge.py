"""Merging shards of side-memory changes (WISE-Merge)."""

from __future__ import annotations

import torch


def ties_merge(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023) of task vectors: trim each to its largest `density`
    fraction, elect a sign per entry, average the entries that agree with it."""
    trimmed = []
    for d in deltas:
        flat = d.abs().flatten()
        k = max(1, int(round(density * flat.numel())))
        cut = flat.kthvalue(flat.numel() - k + 1).values if k < flat.numel() else flat.new_tensor(0.0)
        trimmed.append(torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
