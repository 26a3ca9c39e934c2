"""Turning (prompt, target) text into model inputs, the same way for every method and metric."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editkit.errors import InvalidRequest

IGNORE = -100  # label value that cross-entropy skips


def target_text(prompt: str, target: str) -> str:
    """The target as it continues the prompt: separated by one space unless either side has one."""
    if prompt.endswith((" ", "\n")) or target.startswith((" ", "\n")):
        return target
    return " " + target


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with the tokenizer's special prefix, e.g. BOS) and of the target.

    Encoded separately so the boundary between them never merges into one token."""
    prompt_ids = tokenizer(prompt).input_ids
    target_ids = tokenizer(target_text(prompt, target), add_special_tokens=False).input_ids
    if not target_ids:
        raise InvalidRequest(f"target {target!r} encodes to no tokens")
    return list(prompt_ids), list(target_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): target token ids at target positions, IGNORE elsewhere
    target_ids: list[list[int]]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.target_ids)


def teacher_forced_batch(tokenizer, prompts: list[str], targets: list[str | None], pad_to: int | None = None) -> Batch:
    """prompt+target rows for teacher forcing, right-padded (to at least `pad_to`); labels are
    aligned with input_ids (not shifted). A None target gives a prompt-only row."""
    rows, labels, target_ids = [], [], []
    for prompt, target in zip(prompts, targets, strict=True):
        p, t = (list(tokenizer(prompt).input_ids), []) if target is None else encode_pair(tokenizer, prompt, target)
        rows.append(p + t)
        labels.append([IGNORE] * len(p) + t)
        target_ids.append(t)
    width = max(max(len(r) for r in rows), pad_to or 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    return Batch(ids, mask, lab, target_ids)


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the target tokens: position t predicts label t+1."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def last_token_of(tokenizer, prompt: str, part: str) -> int | None:
    """Index, in `tokenizer(prompt).input_ids`, of the last token of the last occurrence of
    `part` in `prompt` (case-insensitive); None where `part` does not occur."""
    start = prompt.lower().rfind(part.strip().lower())
    if start < 0 or not part.strip():
        return None
    end = start + len(part.strip())
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # slow tokenizers: count the prefix's tokens
        ids, prefix = tokenizer(prompt).input_ids, tokenizer(prompt[:end]).input_ids
        return min(len(prefix), len(ids)) - 1
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return inside[-1] if inside else None
