"""The closed-form weight shift of one module for one turn.

From the normalised features, each row's wanted output change is one normalised gradient step
seen through its own key (UltraEdit, after MEND's rank-one gradient):

    v_i = -lr * |k_hat_i|^2 * g_hat_i

and the shift of the (out, in) weight is a ridge regression of those changes on the raw keys
K (rows k_i) - the whole "training":

    UltraEdit:   dW^T = (K^T K + lambda I)^-1 K^T V

Two AlphaEdit (arXiv 2410.02355) terms are options. Earlier edits' keys K_p, kept as their Gram
matrix G_p = K_p^T K_p, enter the normal equations so the shift also keeps the module's output
at those keys: dW^T = (K^T K + beta G_p + lambda I)^-1 K^T V. A null-space projection P of
preserved keys confines the shift to directions they do not use (dW k ~ 0 for them):
dW^T = (P (K^T K + beta G_p) + lambda I)^-1 P K^T V. Either way one in x in system per module
and turn (or an n x n one: see ridge_shift)."""

from __future__ import annotations

import torch


def target_values(k_hat: torch.Tensor, g_hat: torch.Tensor, lr: float) -> torch.Tensor:
    """(n, out) wanted output changes from normalised keys (n, in) and value gradients (n, out)."""
    return -lr * (k_hat * k_hat).sum(dim=1, keepdim=True) * g_hat


def ridge_shift(keys: torch.Tensor, values: torch.Tensor, ridge: float,
                projection: torch.Tensor | None = None, prior: torch.Tensor | None = None) -> torch.Tensor:
    """(out, in) weight shift that maps keys (n, in) to values (n, out) in the ridge sense,
    optionally inside the column space of `projection` (in, in) and keeping the output at the
    keys whose (weighted) Gram matrix is `prior` (in, in). Computed in float64.

    Without a prior and with fewer rows than input features (a turn of 100 requests has a few
    hundred rows) it is solved as an n x n system through the push-through identity
    (P K^T K + lambda I)^-1 P K^T = P K^T (K P K^T + lambda I)^-1."""
    k = keys.to(torch.float64)
    v = values.to(torch.float64)
    n, d = k.shape
    p = None if projection is None else projection.to(torch.float64)
    kp = k if p is None else k @ p  # rows k_i^T P (P is symmetric)
    if prior is None and n <= d:
        system = kp @ k.T + ridge * torch.eye(n, dtype=torch.float64, device=k.device)
        return (kp.T @ torch.linalg.solve(system, v)).T
    gram = k.T @ k if prior is None else k.T @ k + prior.to(torch.float64)
    if p is not None:
        gram = p @ gram
    system = gram + ridge * torch.eye(d, dtype=torch.float64, device=k.device)
    return torch.linalg.solve(system, kp.T @ v).T
