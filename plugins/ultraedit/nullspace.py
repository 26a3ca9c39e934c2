"""AlphaEdit's null-space projection, from text editkit ships: the inputs of an edited module
on the built-in unrelated pool (editkit.unrelated) are the preserved keys; the projection
keeps only the input directions that hold (almost) none of their energy, so a shift confined
to them leaves the module's output on such text (nearly) unchanged.

AlphaEdit estimates the preserved keys' second moment on 100,000 Wikipedia records and cuts
its eigenvalues at an absolute threshold; here the pool is small and the threshold is relative
to the largest eigenvalue, so it means the same thing for every model."""

from __future__ import annotations

import torch

from editkit.sites import Site
from editkit.unrelated import UNRELATED


@torch.no_grad()
def preserved_second_moments(loaded, sites: list[Site]) -> list[torch.Tensor]:
    """Per site, the (in, in) second moment E[k k^T] of the module's inputs over every token of
    the unrelated pool (float64, on the module's device)."""
    modules = [loaded.adapter.module(site) for site in sites]
    enc = loaded.tokenizer(list(UNRELATED), return_tensors="pt", padding=True)
    mask = enc.attention_mask.bool()
    seen: list[torch.Tensor | None] = [None] * len(sites)

    def hook(i):
        def record(module, args, output):
            seen[i] = args[0].detach()
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        loaded.model(input_ids=enc.input_ids.to(loaded.device), attention_mask=enc.attention_mask.to(loaded.device))
    finally:
        for h in handles:
            h.remove()
    moments = []
    for x in seen:
        k = x[mask.to(x.device)].to(torch.float64)
        moments.append(k.T @ k / k.shape[0])
    return moments


def null_space_projection(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """(in, in) projection onto the eigenvectors of `moment` whose eigenvalue is at most
    `threshold` times the largest."""
    values, vectors = torch.linalg.eigh(moment)
    keep = vectors[:, values <= threshold * values.max()]
    return keep @ keep.T
