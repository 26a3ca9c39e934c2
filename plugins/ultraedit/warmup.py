"""Warm-up edits for the running statistics (StableEdit's warm-up stage), built from text
editkit ships: each text of the built-in unrelated pool, its last word cut off, becomes a
prompt whose target is the last word of another text of the pool - counterfactual pairs
shaped like real edits. Their features seed the statistics before the first real turn; the
model itself is not edited with them (StableEdit applies its warm-up edits, which would write
made-up facts into a served model)."""

from __future__ import annotations

from editkit.unrelated import UNRELATED


def warmup_pairs() -> tuple[list[str], list[str]]:
    """(prompts, targets): deterministic, one pair per pool text."""
    split = [text.rsplit(" ", 1) for text in UNRELATED]
    prompts = [head for head, _ in split]
    lasts = [tail.strip(".,?!") or tail for _, tail in split]
    shift = len(lasts) // 2
    targets = [lasts[(i + shift) % len(lasts)] for i in range(len(lasts))]
    return prompts, targets
