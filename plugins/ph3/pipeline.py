"""The whole PH3 recipe in one place, shared by the CLI and the benchmark: split the items,
locate heads on one split, choose k for each direction on another, report rates on the third;
and the heads file (JSON) that carries the result to `editkit intervention add ph3`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from editkit.errors import InvalidRequest
from editkit.model import LoadedModel

from .evaluate import DEFAULT_KS, FAVOURS, PRUNED_KIND, choose_k, evaluate_rates, perplexity, rates_with
from .items import ConflictItem, split_items
from .locate import HeadScores, locate_heads

HEADS_FORMAT = 1


def run_ph3(loaded: LoadedModel, items: list[ConflictItem], *, seed: int = 0, mode: str = "direct",
            order: str = "effect", ks: tuple[int, ...] = DEFAULT_KS, tolerance: float = 0.1,
            fractions: tuple[float, float, float] = (0.4, 0.3, 0.3),
            progress: Callable[[str, int, int], None] | None = None,
            scores: HeadScores | None = None) -> dict[str, Any]:
    """Locate (locate split), choose k per direction (validation split), measure (test split).
    Returns the heads-file document. `scores` from an earlier call with the same items and
    seed skips the locate step (e.g. to compare pruning orders on the same scores)."""
    splits = split_items(items, seed, fractions)
    if not splits["locate"] or not splits["validation"] or not splits["test"]:
        raise InvalidRequest(f"{len(items)} conflict items are too few for three non-empty splits "
                             "(locate / validation / test); use more items")
    step = (lambda stage: (lambda done, total: progress(stage, done, total))) if progress else (lambda stage: None)
    if scores is None:
        scores = locate_heads(loaded, splits["locate"], mode=mode, order=order, progress=step("locate"))
    else:
        scores = dataclasses.replace(scores, order=order)
    val_base = evaluate_rates(loaded, splits["validation"])
    test_base = {**evaluate_rates(loaded, splits["test"]), "perplexity": perplexity(loaded)}
    choice, test = {}, {"before": test_base}
    for favour in FAVOURS:
        if not scores.prune_ranked(PRUNED_KIND[favour]):
            continue
        choice[favour] = choose_k(loaded, scores, favour, splits["validation"], ks, tolerance, val_base,
                                  progress=step(f"choose k ({favour})"))
        if choice[favour]["k"]:  # k = 0: validation found no pruning worth recommending
            heads = scores.top(PRUNED_KIND[favour], choice[favour]["k"])
            test[favour] = rates_with(loaded, splits["test"], heads, with_perplexity=True)
    return {"format": HEADS_FORMAT, "method": "ph3", "model": loaded.name, "fingerprint": loaded.fingerprint,
            "seed": seed, "splits": {name: len(part) for name, part in splits.items()},
            "split_items": {name: [it.to_dict() for it in part] for name, part in splits.items()},
            **scores.to_dict(), "choice": choice, "test": test}


def write_heads(doc: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def read_heads(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequest(f"cannot read heads file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InvalidRequest(f"heads file {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("method") != "ph3":
        raise InvalidRequest(f"{path} is not a ph3 heads file (write one with `editkit ph3 locate`)")
    if doc.get("format") != HEADS_FORMAT:
        raise InvalidRequest(f"heads file {path} has format {doc.get('format')}; this editkit reads {HEADS_FORMAT}")
    HeadScores.from_dict(doc)  # validates the scores matrix
    return doc


def heads_to_prune(doc: dict[str, Any], favour: str, k: int | None = None) -> tuple[list[tuple[int, int]], int]:
    """The heads a heads file says to prune to favour `favour`, and k (default: the k chosen on
    the validation split when the file was made)."""
    if favour not in FAVOURS:
        raise InvalidRequest(f"favour must be 'memory' or 'context', not '{favour}'")
    scores = HeadScores.from_dict(doc)
    kind = PRUNED_KIND[favour]
    if k is None:
        chosen = (doc.get("choice") or {}).get(favour)
        if not chosen:
            raise InvalidRequest(f"the heads file has no chosen k for favouring {favour}; pass --k")
        k = int(chosen["k"])
        if k == 0:
            raise InvalidRequest(f"on the validation split no k raised the {favour} rate while keeping "
                                 "clean accuracy within tolerance; pass --k to prune anyway")
    available = len(scores.prune_ranked(kind))
    if not 1 <= k <= available:
        raise InvalidRequest(f"k must be between 1 and {available} (the {kind} heads in the file's pruning "
                             f"order), got {k}")
    return scores.top(kind, k), k


def state_for(heads: list[tuple[int, int]], favour: str, k: int, source: str = "") -> tuple[dict, dict, dict]:
    """(config, tensors, meta) for Session.add_intervention('ph3', config, state=(tensors, meta))."""
    tensors = {"heads": torch.tensor(heads, dtype=torch.int64).reshape(-1, 2)}
    return {"favour": favour, "source": source}, tensors, {"k": k, "kind": PRUNED_KIND[favour]}
