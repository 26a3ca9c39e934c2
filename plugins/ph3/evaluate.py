"""Measuring what pruning does: memory / context rates on conflict prompts, clean accuracy
and perplexity as guardrails, the choice of k on a validation split, and a random-head baseline."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import torch

from editkit.errors import InvalidRequest
from editkit.model import LoadedModel

from .intervention import pruned
from .items import ConflictItem
from .locate import HeadScores, last_logits

FAVOURS = ("memory", "context")
PRUNED_KIND = {"memory": "context", "context": "memory"}  # favour memory -> prune context heads
DEFAULT_KS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)

PLAIN_SENTENCES = [
    "The sun rises in the east and sets in the west.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the window to let some fresh air into the room.",
    "Many people enjoy reading a good book on a rainy afternoon.",
    "The train to the city leaves every morning at eight o'clock.",
    "Children learn to read and write at primary school.",
]


def evaluate_rates(loaded: LoadedModel, items: list[ConflictItem], batch_size: int = 32,
                   clean: bool = True) -> dict[str, float]:
    """On the conflict prompts, the share of items whose greedy next token is the memorised
    answer's first token (memory_rate) or the context's (context_rate); on the clean prompts
    (unless clean=False), the share answered correctly (clean_accuracy)."""
    if not items:
        raise InvalidRequest("no items to evaluate")
    conflict = last_logits(loaded, [it.conflict_prompt for it in items], batch_size).argmax(-1)
    mem = torch.tensor([it.memory_token for it in items])
    ctx = torch.tensor([it.context_token for it in items])
    out = {"n": len(items), "memory_rate": float((conflict == mem).float().mean()),
           "context_rate": float((conflict == ctx).float().mean())}
    if clean:
        answers = last_logits(loaded, [it.prompt for it in items], batch_size).argmax(-1)
        out["clean_accuracy"] = float((answers == mem).float().mean())
    return out


@torch.no_grad()
def perplexity(loaded: LoadedModel, texts: list[str] | None = None) -> float:
    """Token-level perplexity of the model on a few plain sentences."""
    texts = texts or PLAIN_SENTENCES
    tok = loaded.tokenizer
    nll, count = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids.to(loaded.device)
        logits = loaded.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))


def rates_with(loaded: LoadedModel, items: list[ConflictItem], heads: list[tuple[int, int]],
               with_perplexity: bool = False, clean: bool = True) -> dict[str, float]:
    """evaluate_rates (and perplexity) with `heads` pruned; nothing stays changed afterwards."""
    with pruned(loaded, heads):
        out = evaluate_rates(loaded, items, clean=clean)
        if with_perplexity:
            out["perplexity"] = perplexity(loaded)
    return out


def choose_k(loaded: LoadedModel, scores: HeadScores, favour: str, items: list[ConflictItem],
             ks: tuple[int, ...] = DEFAULT_KS, tolerance: float = 0.1, baseline: dict | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The k (pruning the first k heads, in pruning order, of the kind that works against
    `favour`) that most raises the favoured rate on `items` (the validation split) while clean
    accuracy stays within `tolerance` of unpruned; ties go to the smaller k. k is 0 when no k
    both raises the rate and keeps clean accuracy: then pruning is not recommended. Returns k,
    the per-k table and the baseline."""
    if favour not in FAVOURS:
        raise InvalidRequest(f"favour must be 'memory' or 'context', not '{favour}'")
    kind = PRUNED_KIND[favour]
    available = len(scores.prune_ranked(kind))
    candidates = sorted({k for k in ks if 1 <= k <= available})
    if not candidates:
        raise InvalidRequest(f"no {kind} heads to prune (none both scored {'> 0' if kind == 'memory' else '< 0'} "
                             "and has a positive pruning gain)")
    base = baseline or evaluate_rates(loaded, items)
    rate = f"{favour}_rate"
    table = []
    for i, k in enumerate(candidates):
        row = rates_with(loaded, items, scores.top(kind, k))
        table.append({"k": k, **row})
        if progress:
            progress(i + 1, len(candidates))
    usable = [r for r in table if r["clean_accuracy"] >= base["clean_accuracy"] - tolerance - 1e-9
              and r[rate] > base[rate]]
    best = max(usable, key=lambda r: (r[rate], -r["k"]))["k"] if usable else 0
    return {"favour": favour, "pruned_kind": kind, "k": best, "tolerance": tolerance,
            "baseline": base, "table": table, "usable": bool(usable)}


def random_heads(num_layers: int, num_heads: int, k: int, rng: random.Random) -> list[tuple[int, int]]:
    flat = rng.sample(range(num_layers * num_heads), k)
    return [(i // num_heads, i % num_heads) for i in flat]


def random_baseline(loaded: LoadedModel, items: list[ConflictItem], k: int, draws: int = 5,
                    seed: int = 0, clean: bool = True) -> dict[str, Any]:
    """Rates with k heads drawn uniformly at random from all heads, `draws` times; means and each draw."""
    rng = random.Random(seed)
    adapter = loaded.adapter
    rows = []
    for _ in range(draws):
        heads = random_heads(adapter.num_layers, adapter.num_heads, k, rng)
        rows.append({"heads": heads, **rates_with(loaded, items, heads, clean=clean)})
    keys = ("memory_rate", "context_rate") + (("clean_accuracy",) if clean else ())
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in keys}
    return {"k": k, "draws": draws, "seed": seed, "mean": mean, "runs": rows}
