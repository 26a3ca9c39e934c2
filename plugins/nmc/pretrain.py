"""Meta-training and measuring the synthetic-gradient module.

pretrain(): for each training edit (each from an empty memory), walk the slow path, Adam with
true gradients from v = 0, and keep (features, true gradient) at every point; then fit the
module to those pairs (relative squared error, Adam, mini-batches).

evaluate_feedback(): on held-out edits, from the same start (v = 0, empty memory):
cosine(predicted, true gradient) at the start; the share of edits one fast step absorbs
(against the untrained module and against a true-gradient step with the same line search);
steps until the margin is met for the editor's path (fast steps, then slow Adam steps), for Adam
alone and for plain SGD with a fixed learning rate."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from editkit.errors import InvalidRequest
from editkit.schemas import EditRequest

from .editor import NMCEditor
from .problem import EditProblem, Scored
from .feedback import feedback_loss

Progress = Callable[[str, int, int], None]


def counterfact_requests(path: str | Path, n: int, offset: int = 0) -> list[EditRequest]:
    """Records offset..offset+n of a CounterFact file, read through the `counterfact` suite."""
    from editkit.host import get_host

    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"{path} not found (CounterFact records live in the shared data; pass --data)")
    return get_host().suite("counterfact")().load(path, limit=offset + n)[offset:]


def edit_problem(editor: NMCEditor, request: EditRequest) -> EditProblem:
    """The write problem of `request` against the editor's current memory."""
    return editor.plan(request, "")[0]


@dataclass
class Samples:
    """(features, true gradient) pairs; features as the module takes them (state, value in units)."""

    rows: list[tuple[torch.Tensor, ...]]

    def add(self, editor: NMCEditor, problem: EditProblem, scored: Scored, value: torch.Tensor,
            grad: torch.Tensor) -> None:
        unit = editor.scale / math.sqrt(editor.hidden)
        self.rows.append((scored.lens_first[0], scored.lens_mean[0], problem.key, problem.state / unit,
                          value.detach() / unit, grad))

    def tensors(self) -> list[torch.Tensor]:
        return [torch.stack(x) for x in zip(*self.rows)]


def collect(editor: NMCEditor, requests: list[EditRequest], steps: int, progress: Progress | None = None) -> Samples:
    """(features, true gradient) along each edit's slow path from v = 0."""
    cfg = editor.config
    samples = Samples([])
    lr = cfg.slow_lr * editor.scale / math.sqrt(editor.hidden)
    for i, req in enumerate(requests):
        problem = edit_problem(editor, req)
        v = torch.zeros(editor.hidden, device=editor.device, requires_grad=True)
        opt = torch.optim.Adam([v], lr=lr)
        for _ in range(steps):
            scored, grad = editor.true_gradient(problem, v.detach())
            samples.add(editor, problem, scored, v.detach(), grad)
            if float(scored.margin[0]) >= cfg.margin:
                break
            opt.zero_grad()
            v.grad = grad
            opt.step()
        if progress:
            progress("collect", i + 1, len(requests))
    return samples


def fit(editor: NMCEditor, samples: Samples, epochs: int = 60, lr: float = 1e-3, batch_size: int = 64,
        seed: int = 0, progress: Progress | None = None) -> list[float]:
    """Fit the editor's synthetic-gradient module to the samples; returns the loss per epoch."""
    *features, grads = samples.tensors()
    module = editor.feedback
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    module.train()  # dropout on
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            for epoch in range(epochs):
                order = torch.randperm(len(grads)).to(grads.device)
                total = 0.0
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    loss = feedback_loss(module(*(f[idx] for f in features)), grads[idx])
                    opt.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                losses.append(total / len(order))
                if progress:
                    progress("fit", epoch + 1, epochs)
    finally:
        module.eval()
    return losses


def pretrain(editor: NMCEditor, requests: list[EditRequest], steps: int = 8, epochs: int = 60,
             progress: Progress | None = None, shared_with: Sequence[NMCEditor] = ()) -> dict:
    """Meta-train the editor's module. `shared_with`: editors with memories at other layers
    (same model and key layer) that share one module: it is fitted on every layer's gradients
    and copied into each (measured as good as a module per layer: docs/nmc.md)."""
    editors = [editor, *shared_with]
    if any(len(e.memory) for e in editors):
        raise InvalidRequest("pretrain the synthetic-gradient module on an editor with an empty memory")
    if len({e.key_layer for e in editors}) > 1 or len({e.layer for e in editors}) < len(editors):
        raise InvalidRequest("a shared synthetic-gradient module needs one key layer and different memory layers")
    samples = Samples([row for e in editors for row in collect(e, requests, steps, progress).rows])
    losses = fit(editor, samples, epochs=epochs, progress=progress)
    for other in shared_with:
        other.feedback.load_state_dict(editor.feedback.state_dict())
    return {"records": len(requests), "samples": len(samples.rows), "fit_loss_first": losses[0],
            "fit_loss_last": losses[-1], "layers": [e.layer for e in editors]}


def _steps_to_margin(editor: NMCEditor, problem: EditProblem, value: torch.Tensor, limit: int,
                     update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> int:
    """True-gradient steps (update(v, grad) -> new v) until the margin is met; limit + 1 if never."""
    for taken in range(limit + 1):
        scored, grad = editor.true_gradient(problem, value)
        if float(scored.margin[0]) >= editor.config.margin:
            return taken
        if taken < limit:
            value = update(value, grad)
    return limit + 1


def _adam(editor: NMCEditor):
    v_opt: dict = {}

    def update(v: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        if "p" not in v_opt:
            v_opt["p"] = v.detach().clone().requires_grad_(True)
            v_opt["opt"] = torch.optim.Adam([v_opt["p"]], lr=editor.config.slow_lr * editor.scale
                                            / math.sqrt(editor.hidden))
        v_opt["opt"].zero_grad()
        v_opt["p"].grad = grad
        v_opt["opt"].step()
        return v_opt["p"].detach().clone()
    return update


def sgd_rate(editor: NMCEditor, requests: list[EditRequest]) -> float:
    """Plain SGD's learning rate: the first step moves the value by one slow_lr-sized Adam step
    in every coordinate on the median edit (calibrated on the given, training, edits)."""
    norms = []
    for req in requests:
        problem = edit_problem(editor, req)
        _, grad = editor.true_gradient(problem, torch.zeros(editor.hidden, device=editor.device))
        norms.append(float(grad.norm()))
    step = editor.config.slow_lr * editor.scale  # = Adam's first-step norm, sqrt(H) * per-coordinate lr
    return step / statistics.median(norms)


def evaluate_feedback(editor: NMCEditor, requests: list[EditRequest], sgd_lr: float, limit: int = 60,
                      progress: Progress | None = None) -> dict:
    """Held-out measures of the editor's synthetic-gradient module (see the module docstring)."""
    trained = editor.feedback
    untrained = type(trained)(editor.hidden, editor.config.feedback_hidden).to(editor.device)
    rows = []
    for i, req in enumerate(requests):
        problem = edit_problem(editor, req)
        v0 = torch.zeros(editor.hidden, device=editor.device)
        scored, grad = editor.true_gradient(problem, v0)
        row = {"absorbed_at_start": float(scored.margin[0]) >= editor.config.margin}
        for suffix, module in (("", trained), ("_untrained", untrained)):
            editor.feedback = module
            try:
                with torch.no_grad():
                    pred = editor.predicted_gradient(problem, scored, v0[None])[0]
                _, s = editor.fast_step(problem, v0, scored)
            finally:
                editor.feedback = trained
            row["cosine" + suffix] = float(F.cosine_similarity(pred, grad, dim=0))
            row["one_step" + suffix] = float(s.margin[0]) >= editor.config.margin
        _, s = editor.line_search(problem, v0, -grad)  # the same step along the true gradient
        row["one_step_true_gradient"] = float(s.margin[0]) >= editor.config.margin
        # each path from v = 0, with its cost: rows run through the blocks above (a line search
        # is one batched forward of 1 + len(step_sizes) rows) and backward passes through them
        def nmc_path() -> int:  # as the editor writes: score, one fast step, then slow steps
            with torch.no_grad():
                at_start, _ = problem.score(v0[None])
            value, s = editor.fast_step(problem, v0, at_start)
            if float(s.margin[0]) >= editor.config.margin:
                return 1
            return 1 + _steps_to_margin(editor, problem, value, limit - 1, _adam(editor))

        for name, walk in (("nmc", nmc_path),
                           ("adam", lambda: _steps_to_margin(editor, problem, v0, limit, _adam(editor))),
                           ("sgd", lambda: _steps_to_margin(editor, problem, v0, limit, lambda v, g: v - sgd_lr * g))):
            problem.forward_rows = problem.backward_passes = 0
            row["steps_" + name] = walk()
            row["forward_rows_" + name], row["backward_" + name] = problem.forward_rows, problem.backward_passes
        rows.append(row)
        if progress:
            progress("evaluate", i + 1, len(requests))
    mean = lambda k: sum(float(r[k]) for r in rows) / len(rows)  # noqa: E731
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"edits": len(rows), "step_limit": limit, "sgd_lr": sgd_lr,
            "cosine_mean": mean("cosine"), "cosine_median": med("cosine"),
            "cosine_untrained_mean": mean("cosine_untrained"),
            "absorbed_at_start": mean("absorbed_at_start"), "one_step_success": mean("one_step"),
            "one_step_success_untrained": mean("one_step_untrained"),
            "one_step_success_true_gradient": mean("one_step_true_gradient"),
            "median_steps_nmc": med("steps_nmc"), "median_steps_adam": med("steps_adam"),
            "median_steps_sgd": med("steps_sgd"),
            "mean_cost_to_margin": {k: {"forward_rows": mean("forward_rows_" + k), "backward": mean("backward_" + k)}
                                    for k in ("nmc", "adam", "sgd")},
            "rows": rows}
