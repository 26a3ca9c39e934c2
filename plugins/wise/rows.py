"""Rows WISE trains and scores on: teacher-forced prompt(+target) rows with the span of
tokens each row's activation score counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editkit.tokens import teacher_forced_batch


@dataclass
class Rows:
    """Right-padded rows with target labels and the token span each row is scored on."""

    ids: torch.Tensor  # (B, T)
    attn: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), aligned with ids (not shifted)
    score: torch.Tensor  # (B, T) 1.0 where the activation score counts the token

    def to(self, device) -> "Rows":
        return Rows(self.ids.to(device), self.attn.to(device), self.labels.to(device), self.score.to(device))


def make_rows(tokenizer, specs: list[tuple[str, str | None, int | None]], pad_to: int | None = None,
              score_target: bool = True) -> Rows:
    """specs: (prompt, target or None, n) — the activation score counts the last n prompt
    tokens (None: all of them) and, with score_target, the target tokens; labels mark the
    target tokens."""
    batch = teacher_forced_batch(tokenizer, [p for p, _, _ in specs], [t for _, t, _ in specs], pad_to=pad_to)
    sc = torch.zeros(batch.input_ids.shape)
    for i, ((_, _, n), target) in enumerate(zip(specs, batch.target_ids)):
        length = int(batch.attention_mask[i].sum())
        prompt_len = length - len(target)
        n = prompt_len if n is None else min(n, prompt_len)
        sc[i, prompt_len - n: prompt_len] = 1.0
        if score_target:
            sc[i, prompt_len: length] = 1.0
    return Rows(batch.input_ids, batch.attention_mask, batch.labels, sc)
