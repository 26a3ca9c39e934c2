"""Lifelong normalization: running statistics of one module's editing features z = [key | value
gradient], kept across turns.

Every turn's rows are merged in with the exact count-weighted (Chan et al.) update of the
mean and of the sum of squared deviations, so splitting a turn into batches, or feeding the
same rows in one call, gives the same statistics. With `whiten`, the value-gradient part also
keeps its full scatter matrix and is whitened with the inverse square root of its covariance
(StableEdit's full whitening) once more rows than dimensions have been seen; before that, and
for the keys always, each dimension is standardised on its own (UltraEdit).

Kept in float64: ten thousand turns of merges must not drift."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

EPS = torch.finfo(torch.float32).eps


def tensor_problem(tensors: dict[str, torch.Tensor], want: dict[str, tuple[int, ...]]) -> str | None:
    """What is wrong with the named tensors of a state (missing, misshapen, not finite floats),
    or None."""
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None:
            return f"'{name}' is missing"
        if tuple(t.shape) != shape:
            return f"'{name}' has shape {tuple(t.shape)}, expected {shape}"
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            return f"'{name}' holds non-finite or non-float values"
    return None


@dataclass(frozen=True)
class RunningStats:
    key_dim: int
    count: torch.Tensor  # () float64: rows seen
    mean: torch.Tensor  # (key_dim + value_dim,) float64
    m2: torch.Tensor  # (key_dim + value_dim,) float64: sum of squared deviations
    scatter: torch.Tensor | None  # (value_dim, value_dim) float64 with whitening, else None

    @classmethod
    def empty(cls, key_dim: int, value_dim: int, whiten: bool, device) -> "RunningStats":
        zeros = torch.zeros(key_dim + value_dim, dtype=torch.float64, device=device)
        scatter = torch.zeros((value_dim, value_dim), dtype=torch.float64, device=device) if whiten else None
        return cls(key_dim, torch.zeros((), dtype=torch.float64, device=device), zeros, zeros.clone(), scatter)

    @property
    def value_dim(self) -> int:
        return self.mean.shape[0] - self.key_dim

    def merged(self, keys: torch.Tensor, grads: torch.Tensor) -> "RunningStats":
        """These statistics with the rows [keys | grads] added (a new object; self is unchanged)."""
        x = torch.cat([keys, grads], dim=1).to(self.mean.device, torch.float64)
        b = x.shape[0]
        if b == 0:
            return self
        n = self.count
        total = n + b
        batch_mean = x.mean(dim=0)
        delta = batch_mean - self.mean
        centred = x - batch_mean
        mean = self.mean + delta * (b / total)
        m2 = self.m2 + (centred * centred).sum(dim=0) + delta * delta * (n * b / total)
        scatter = self.scatter
        if scatter is not None:
            v, dv = centred[:, self.key_dim:], delta[self.key_dim:]
            scatter = scatter + v.T @ v + torch.outer(dv, dv) * (n * b / total)
        return replace(self, count=total, mean=mean, m2=m2, scatter=scatter)

    def std(self) -> torch.Tensor:
        return (self.m2 / (self.count - 1).clamp_min(EPS)).sqrt()

    def normalise(self, keys: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised keys, normalised value gradients) in float64."""
        x = torch.cat([keys, grads], dim=1).to(self.mean.device, torch.float64)
        z = (x - self.mean) / (self.std() + EPS)
        k_hat, g_hat = z[:, :self.key_dim], z[:, self.key_dim:]
        if self.scatter is not None and float(self.count) > self.value_dim + 1:
            cov = self.scatter / (self.count - self.value_dim - 1)
            values, vectors = torch.linalg.eigh(cov)
            inv_sqrt = (vectors * values.clamp_min(1e-12).rsqrt()) @ vectors.T
            g_hat = (x[:, self.key_dim:] - self.mean[self.key_dim:]) @ inv_sqrt
        return k_hat, g_hat

    # ---- persistence ---------------------------------------------------------------------
    @staticmethod
    def names(whiten: bool) -> tuple[str, ...]:
        """The tensor names under a state prefix."""
        return ("count", "mean", "m2", "scatter") if whiten else ("count", "mean", "m2")

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.count": self.count, f"{prefix}.mean": self.mean, f"{prefix}.m2": self.m2}
        if self.scatter is not None:
            out[f"{prefix}.scatter"] = self.scatter
        return out

    @classmethod
    def check(cls, tensors: dict[str, torch.Tensor], prefix: str, key_dim: int, value_dim: int,
              whiten: bool) -> str | None:
        """What is wrong with the statistics under `prefix` in `tensors`, or None."""
        shapes = {"count": (), "mean": (key_dim + value_dim,), "m2": (key_dim + value_dim,),
                  "scatter": (value_dim, value_dim)}
        problem = tensor_problem(tensors, {f"{prefix}.{name}": shapes[name] for name in cls.names(whiten)})
        if problem:
            return problem
        if float(tensors[f"{prefix}.count"]) < 0 or bool((tensors[f"{prefix}.m2"] < 0).any()):
            return f"'{prefix}' statistics are negative"
        return None

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, key_dim: int, device) -> "RunningStats":
        def get(name):
            t = tensors.get(f"{prefix}.{name}")
            return None if t is None else t.to(device, torch.float64).clone()
        return cls(key_dim, get("count"), get("mean"), get("m2"), get("scatter"))
