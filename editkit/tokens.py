"""Turning (prompt, target) text into model inputs, the same way for every method and metric."""

from __future__ import annotations

import re
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


def subject_position(tokenizer, prompt: str, subject: str | None) -> int | None:
    """Index in tokenizer(prompt).input_ids of the last token of `subject`'s first occurrence in
    `prompt`; None when it does not occur or the prompt's tokens do not break where it ends."""
    start = prompt.find(subject) if subject else -1
    if start < 0:
        return None
    full = tokenizer(prompt).input_ids
    head = tokenizer(prompt[:start + len(subject)]).input_ids
    if not head or list(full[:len(head)]) != list(head):
        return None
    return len(head) - 1


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


def token_span(tokenizer, prompt: str, part: str) -> tuple[int, int] | None:
    """(first, last) indices, in `tokenizer(prompt).input_ids`, of the tokens of the last
    occurrence of `part` in `prompt` as whole words (exact case first, then any case); None
    where it does not occur ("Paris" is not found in "comparison")."""
    part = part.strip()
    if not part:
        return None
    pattern = r"(?<!\w)" + re.escape(part) + r"(?!\w)"
    found = list(re.finditer(pattern, prompt)) or list(re.finditer(pattern, prompt, re.IGNORECASE))
    if not found:
        return None
    start, end = found[-1].span()
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # slow tokenizers: count the prefix's tokens
        ids = tokenizer(prompt).input_ids
        first, last = len(tokenizer(prompt[:start]).input_ids), len(tokenizer(prompt[:end]).input_ids) - 1
        last = min(last, len(ids) - 1)
        return min(first, last), last
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (inside[0], inside[-1]) if inside else None


def canonical_ids(tokenizer) -> torch.Tensor:
    """(V,) for each token id, one id standing for every token that reads the same once
    stripped of spaces and lowercased (" David" and "David"), so token identity can be compared
    across a word's spellings at the start of a text and inside it."""
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(t.strip().lower(), i) for i, t in enumerate(texts)], dtype=torch.long)
