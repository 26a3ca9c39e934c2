"""Metrics on hand-given prompts and targets: teacher-forced token accuracy, answer-token
predictions for locality, the per-edit reliability / generalization / locality that a Session
journals, and the evaluation figures (both definitions, see DEFINITIONS) the runner reports."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import torch

from editkit.generation import generate, generate_ids
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


# ---------------------------------------------------------------------------------------
# Evaluation over suites: both definitions side by side.
#
#   *_tf  teacher-forced token accuracy: the share of target tokens that are the argmax given
#         the true prefix (what published tables report; known to inflate results).
#   *_em  generated exact match: greedy decoding of exactly as many tokens as the target has,
#         compared after normalise() (what a user sees).
#
# Locality is reported both ways round: "unchanged" (loc_tf: token agreement of the teacher-
# forced predictions with the pre-edit model's; loc_em: the greedy continuation is identical
# to the pre-edit model's) and "accurate" (loc_acc_tf / loc_acc_em: against the probe's
# expected answer, where the data gives one).
# ---------------------------------------------------------------------------------------

METRICS = ("rel_tf", "rel_em", "gen_tf", "gen_em", "loc_tf", "loc_em", "loc_acc_tf", "loc_acc_em",
           "port_tf", "port_em")
METRIC_LABELS = {
    "rel_tf": "Rel (TF)", "rel_em": "Rel (EM)", "gen_tf": "Gen (TF)", "gen_em": "Gen (EM)",
    "loc_tf": "Loc unchanged (TF)", "loc_em": "Loc unchanged (EM)",
    "loc_acc_tf": "Loc acc (TF)", "loc_acc_em": "Loc acc (EM)",
    "port_tf": "Port (TF)", "port_em": "Port (EM)",
}
DEFINITIONS = {
    "tf": "teacher-forced token accuracy: share of target tokens predicted (argmax) given the true prefix",
    "em": "generated exact match: greedy decoding of the target's token length, compared after "
          "normalisation (strip, lowercase, punctuation to spaces, whitespace collapsed)",
    "loc_tf": "locality as token agreement: share of the probe's answer positions whose teacher-forced "
              "argmax equals the pre-edit model's",
    "loc_em": "locality as unchanged generation: the greedy continuation (answer length) is token-for-token "
              "the pre-edit model's",
    "loc_acc": "locality as accuracy against the probe's expected answer (tf and em as above)",
}

_PUNCT = re.compile("[" + re.escape(string.punctuation) + r"\s]+")


def normalise(text: str) -> str:
    """Strip, lowercase, turn punctuation into spaces and collapse runs of whitespace."""
    return _PUNCT.sub(" ", text.lower()).strip()


def exact_match(generated: str, target: str) -> float:
    return float(normalise(generated) == normalise(target))


def mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


@torch.no_grad()
def greedy_token_ids(loaded: LoadedModel, prompts: list[str], lengths: list[int]) -> list[list[int]]:
    """Greedy continuation of each prompt, `lengths[i]` tokens long (cut short at end-of-sequence).

    One left-padded generate call for the batch; greedy decoding is prefix-consistent, so
    generating the longest length and cutting each row equals generating each on its own."""
    if not prompts:
        return []
    new = generate_ids(loaded, prompts, max_new_tokens=max(lengths))  # each row ends at the end token
    return [ids[:n] for ids, n in zip(new, lengths)]


@dataclass
class Probe:
    """One (prompt, target) to score; kind is rel / gen / loc / port."""

    kind: str
    prompt: str
    target: str


@dataclass
class ItemBaseline:
    """What the pre-edit model says on one item's locality probes: the answers scored
    (expected answer, or the pre-edit greedy continuation where the probe has none), the
    teacher-forced argmax tokens at those answers' positions and the greedy continuations."""

    answers: list[str]
    has_answer: list[bool]
    tf_predictions: list[list[int]]
    generations: list[list[int]]

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> "ItemBaseline":
        return cls(**data)


def probe_rows(loaded: LoadedModel, prompts: list[str], targets: list[str]):
    """Teacher-forced hits and argmax predictions, and greedy generations of the targets'
    length, for one group of probes (batched together; the same grouping gives the same numbers)."""
    if not prompts:
        return [], [], [], []
    logits, labels = _forward(loaded, prompts, targets)
    hits = token_hits(logits, labels)
    preds = token_predictions(logits, labels)
    lengths = [len(h) for h in hits]
    gens = greedy_token_ids(loaded, prompts, lengths)
    return hits, preds, gens, lengths


def _decode(loaded: LoadedModel, ids: list[int]) -> str:
    return loaded.tokenizer.decode(ids, skip_special_tokens=True)


def item_baseline(loaded: LoadedModel, request: EditRequest) -> ItemBaseline:
    """The pre-edit model's behaviour on `request`'s locality probes (call on the unedited model)."""
    missing = [p.prompt for p in request.locality if not p.answer]
    generated = iter(greedy_continuations(loaded, missing, max_new_tokens=5) if missing else [])
    answers = [p.answer or (next(generated).strip() or "the") for p in request.locality]
    prompts = [p.prompt for p in request.locality]
    _, preds, gens, _ = probe_rows(loaded, prompts, answers)
    return ItemBaseline(answers, [bool(p.answer) for p in request.locality], preds, gens)


def measure_item(loaded: LoadedModel, request: EditRequest, baseline: ItemBaseline,
                 portability: list | None = None) -> dict[str, float | None]:
    """Every figure for one edit under both definitions (None where the data has no probe).

    All the item's probes go through one teacher-forced batch and one generate call, so the
    same item is always computed the same way (before and after editing)."""
    probes = [Probe("rel", request.prompt, request.target_new)]
    probes += [Probe("gen", r, request.target_new) for r in request.rephrases]
    probes += [Probe("loc", p.prompt, a) for p, a in zip(request.locality, baseline.answers)]
    probes += [Probe("port", p.prompt, p.answer) for p in (portability or []) if p.answer]
    hits, preds, gens, _ = probe_rows(loaded, [p.prompt for p in probes], [p.target for p in probes])
    scores: dict[str, list[float]] = {k: [] for k in METRICS}
    loc_i = 0
    for probe, h, pred, gen in zip(probes, hits, preds, gens):
        tf = sum(h) / len(h)
        em = exact_match(_decode(loaded, gen), probe.target)
        if probe.kind == "loc":
            scores["loc_tf"].append(agreement(baseline.tf_predictions[loc_i], pred))
            scores["loc_em"].append(float(gen == baseline.generations[loc_i]))
            if baseline.has_answer[loc_i]:
                scores["loc_acc_tf"].append(tf)
                scores["loc_acc_em"].append(em)
            loc_i += 1
        else:
            scores[f"{probe.kind}_tf"].append(tf)
            scores[f"{probe.kind}_em"].append(em)
    return {k: mean(v) for k, v in scores.items()}


def summarise(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the rows that have it."""
    return {k: mean(r.get(k) for r in rows) for k in METRICS}
