"""Metrics on hand-given prompts and targets: teacher-forced token accuracy, answer-token
predictions for locality, and the per-edit reliability / generalization / locality."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editkit.model import LoadedModel
from editkit.schemas import EditRequest
from editkit.tokens import IGNORE, teacher_forced_batch


def token_hits(logits: torch.Tensor, labels: torch.Tensor) -> list[list[bool]]:
    """Per row, whether the argmax at each target position's predecessor equals the label."""
    preds = logits[:, :-1].argmax(-1)
    gold = labels[:, 1:]
    rows = []
    for p, g in zip(preds, gold):
        keep = g != IGNORE
        rows.append((p[keep] == g[keep]).tolist())
    return rows


def token_predictions(logits: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Per row, the argmax token at every target position (what the model would say there)."""
    preds = logits[:, :-1].argmax(-1)
    gold = labels[:, 1:]
    return [p[g != IGNORE].tolist() for p, g in zip(preds, gold)]


@torch.no_grad()
def _forward(loaded: LoadedModel, prompts: list[str], targets: list[str]):
    batch = teacher_forced_batch(loaded.tokenizer, prompts, targets).to(loaded.device)
    logits = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits, batch.labels


def teacher_forced_accuracy(loaded: LoadedModel, prompts: list[str], targets: list[str]) -> list[float]:
    """Fraction of target tokens the model predicts given the true prefix (the published tables' metric)."""
    if not prompts:
        return []
    logits, labels = _forward(loaded, prompts, targets)
    return [sum(h) / len(h) for h in token_hits(logits, labels)]


def answer_predictions(loaded: LoadedModel, prompts: list[str], answers: list[str]) -> list[list[int]]:
    if not prompts:
        return []
    logits, labels = _forward(loaded, prompts, answers)
    return token_predictions(logits, labels)


def agreement(before: list[int], after: list[int]) -> float:
    """Share of positions whose predicted token is unchanged."""
    return sum(a == b for a, b in zip(before, after)) / max(1, len(before))


@torch.no_grad()
def greedy_continuations(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    from editkit.generation import generate

    return generate(loaded, prompts, max_new_tokens=max_new_tokens)


@dataclass
class LocalityBaseline:
    """What the unedited (pre-edit) model says on a request's locality probes."""

    answers: list[str]
    predictions: list[list[int]]


def locality_baseline(loaded: LoadedModel, request: EditRequest) -> LocalityBaseline:
    prompts = [p.prompt for p in request.locality]
    missing = [p.prompt for p in request.locality if not p.answer]
    generated = iter(greedy_continuations(loaded, missing) if missing else [])
    # A probe with no answer is scored on the pre-edit model's own greedy continuation.
    answers = [p.answer or (next(generated).strip() or "the") for p in request.locality]
    return LocalityBaseline(answers, answer_predictions(loaded, prompts, answers))


def edit_scores(loaded: LoadedModel, request: EditRequest, baseline: LocalityBaseline) -> dict[str, float | None]:
    """Reliability, generalization (None without rephrases) and locality (None without probes)."""
    rel = teacher_forced_accuracy(loaded, [request.prompt], [request.target_new])[0]
    gen = teacher_forced_accuracy(loaded, request.rephrases, [request.target_new] * len(request.rephrases))
    loc_prompts = [p.prompt for p in request.locality]
    after = answer_predictions(loaded, loc_prompts, baseline.answers)
    loc = [agreement(b, a) for b, a in zip(baseline.predictions, after)]
    return {"reliability": rel,
            "generalization": sum(gen) / len(gen) if gen else None,
            "locality": sum(loc) / len(loc) if loc else None}
