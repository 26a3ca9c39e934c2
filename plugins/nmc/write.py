"""Writing a value into the memory: fast steps along the synthetic gradient (a line search
scored in one batch), then slow Adam steps on the true gradient, each of which also trains
the synthetic-gradient module."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .feedback import feedback_loss
from .problem import EditProblem, Scored


class Writing:
    """The NMCEditor's write path (a mixin: the memory and the module live on the editor)."""

    def predicted_gradient(self, problem: EditProblem, scored: Scored, values: torch.Tensor) -> torch.Tensor:
        """Synthetic gradients at candidate values (m, H), from their scores."""
        unit = self.scale / math.sqrt(self.hidden)
        return self.feedback(scored.lens_first, scored.lens_mean, problem.key.expand_as(values),
                             (problem.state / unit).expand_as(values), values / unit)

    def fast_step(self, problem: EditProblem, value: torch.Tensor, scored: Scored):
        """One synthetic-gradient step: candidates along the predicted descent direction at the
        configured step norms (and staying put), all scored in one batch; the best is kept."""
        with torch.no_grad():
            g = self.predicted_gradient(problem, scored, value[None])[0]
        if not bool(torch.isfinite(g).all()):
            return value, scored
        return self.line_search(problem, value, -g)

    @torch.no_grad()
    def line_search(self, problem: EditProblem, value: torch.Tensor, direction: torch.Tensor):
        """The best of `value` moved along `direction` by each configured step norm (or not at
        all), scored in one batch: (value, its scores)."""
        direction = direction / direction.norm().clamp_min(1e-12)
        sizes = torch.tensor([0.0] + list(self.config.step_sizes), device=value.device) * self.scale
        candidates = value[None] + sizes[:, None] * direction[None]
        scored, _ = problem.score(candidates)
        best = int(torch.argmin(torch.nan_to_num(scored.loss, nan=float("inf"))))
        pick = Scored(*(t[best:best + 1] for t in (scored.loss, scored.margin, scored.lens_first, scored.lens_mean)))
        return candidates[best].clone(), pick

    def true_gradient(self, problem: EditProblem, value: torch.Tensor) -> tuple[Scored, torch.Tensor]:
        v = value.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            scored, loss = problem.score(v[None], need_graph=True)
            grad = torch.autograd.grad(loss, v)[0]
        problem.backward_passes += 1
        return scored, grad

    def train_feedback(self, problem: EditProblem, scored: Scored, value: torch.Tensor, grad: torch.Tensor,
                       lr: float) -> float:
        """One SGD step of the synthetic-gradient module towards a true gradient."""
        with torch.enable_grad():
            pred = self.predicted_gradient(problem, scored, value[None].detach())
            err = feedback_loss(pred, grad[None])
            params = [p for p in self.feedback.parameters()]
            grads = torch.autograd.grad(err, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        if lr > 0 and bool(torch.isfinite(norm)):
            step = lr / max(1.0, float(norm))  # clipped: the relative error's gradient can be large
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(step * g)
        return float(err.detach())

    def write(self, problem: EditProblem, start: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Fast steps, then slow steps until the margin is met; returns the value and statistics."""
        cfg = self.config
        value = start.detach().clone()
        with torch.no_grad():
            scored, _ = problem.score(value[None])
        ok = lambda s: float(s.margin[0]) >= cfg.margin  # noqa: E731
        fast = slow = 0
        while not ok(scored) and fast < cfg.fast_steps:
            value, scored = self.fast_step(problem, value, scored)
            fast += 1
        absorbed_fast = ok(scored)
        cosines, errors = [], []
        if not ok(scored) and cfg.slow_steps:
            v = value.clone().requires_grad_(True)
            opt = torch.optim.Adam([v], lr=cfg.slow_lr * self.scale / math.sqrt(self.hidden))
            while slow < cfg.slow_steps:
                scored, grad = self.true_gradient(problem, v.detach())
                if ok(scored):
                    break
                with torch.no_grad():
                    pred = self.predicted_gradient(problem, scored, v.detach()[None])[0]
                    cosines.append(float(F.cosine_similarity(pred, grad, dim=0)))
                errors.append(self.train_feedback(problem, scored, v.detach(), grad, cfg.feedback_lr))
                opt.zero_grad()
                v.grad = grad
                opt.step()
                slow += 1
            value = v.detach()
            if slow == cfg.slow_steps:  # the last update has not been scored yet
                with torch.no_grad():
                    scored, _ = problem.score(value[None])
        stats = {"loss": float(scored.loss[0]), "margin": float(scored.margin[0]), "absorbed": ok(scored),
                 "absorbed_fast": absorbed_fast, "fast_steps": fast, "slow_steps": slow, "steps": fast + slow}
        if cosines:
            stats["feedback_cosine"] = sum(cosines) / len(cosines)
            stats["feedback_error"] = sum(errors) / len(errors)
        return value, stats
