"""Measuring edits, in one place for the session (the figures it journals with each edit),
the service (/v1/evaluate) and the evaluation runner: teacher-forced token accuracy and
generated exact match (DEFINITIONS) of an edit's prompt, rephrasings, locality probes and
portability questions, against the pre-edit model's behaviour (item_baselines) where a
figure needs it (measure_items)."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import torch

from editkit.forward import unembed_inputs
from editkit.generation import generate, generate_from_ids, generate_ids
from editkit.model import LoadedModel
from editkit.schemas import EditRequest
from editkit.tokens import IGNORE, encode_pair, teacher_forced_batch

TF_ROWS = 16  # probes per teacher-forced pass (grouped by length, so little padding)


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
def teacher_forced_predictions(loaded: LoadedModel, prompts: list[str], targets: list[str]) -> list[list[int]]:
    """Per probe, the argmax token at every target position given the true prefix.

    Probes run in passes of TF_ROWS rows of similar length (right padding under the attention
    mask: a row's argmaxes do not depend on its batch-mates beyond float noise), and only the
    target positions go through the vocabulary projection."""
    lengths = [sum(map(len, encode_pair(loaded.tokenizer, p, t))) for p, t in zip(prompts, targets)]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), TF_ROWS):
        group = order[start:start + TF_ROWS]
        batch = teacher_forced_batch(loaded.tokenizer, [prompts[i] for i in group],
                                     [targets[i] for i in group]).to(loaded.device)
        hidden = unembed_inputs(loaded, batch.input_ids, batch.attention_mask)
        rows, cols = (batch.labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
        preds = loaded.adapter.unembed(hidden[rows, cols]).argmax(-1).tolist()
        for row, pred in zip(rows.tolist(), preds):
            out[group[row]].append(pred)
    return out


def teacher_forced_accuracy(loaded: LoadedModel, prompts: list[str], targets: list[str]) -> list[float]:
    """Fraction of target tokens the model predicts given the true prefix (the published tables' metric)."""
    preds = teacher_forced_predictions(loaded, prompts, targets)
    gold = [encode_pair(loaded.tokenizer, p, t)[1] for p, t in zip(prompts, targets)]
    return [sum(a == b for a, b in zip(p, g)) / len(g) for p, g in zip(preds, gold)]


def answer_predictions(loaded: LoadedModel, prompts: list[str], answers: list[str]) -> list[list[int]]:
    return teacher_forced_predictions(loaded, prompts, answers)


def agreement(before: list[int], after: list[int]) -> float:
    """Share of positions whose predicted token is unchanged."""
    return sum(a == b for a, b in zip(before, after)) / max(1, len(before))


@torch.no_grad()
def greedy_continuations(loaded: LoadedModel, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    return generate(loaded, prompts, max_new_tokens=max_new_tokens)


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
    length, for one group of probes (see teacher_forced_predictions and greedy_generations)."""
    if not prompts:
        return [], [], [], []
    pairs = [encode_pair(loaded.tokenizer, p, t) for p, t in zip(prompts, targets)]
    preds = teacher_forced_predictions(loaded, prompts, targets)
    hits = [[a == b for a, b in zip(pred, gold)] for pred, (_, gold) in zip(preds, pairs)]
    gens = greedy_generations(loaded, [p for p, _ in pairs], [t for _, t in pairs], preds)
    return hits, preds, gens, [len(t) for _, t in pairs]


@torch.no_grad()
def greedy_generations(loaded: LoadedModel, prompt_ids: list[list[int]], target_ids: list[list[int]],
                       preds: list[list[int]]) -> list[list[int]]:
    """Greedy continuation of each prompt, as many tokens long as its target (cut short at
    end-of-sequence), given the teacher-forced predictions `preds` on that target.

    While greedy decoding follows the target its prefix is the teacher-forced one, so its
    tokens are the teacher-forced argmaxes up to and including the first miss; only a row that
    leaves its target before the last token is decoded further, from where it left (one
    left-padded generate call for all such rows). That holds for a causal model only: while a
    component that reads the whole input is attached (WISE's routing), every row is decoded
    from its prompt."""
    eos = loaded.tokenizer.eos_token_id
    gens: list[list[int]] = []
    todo: list[tuple[int, int]] = []  # (row, tokens still to generate)
    if loaded.whole_input_readers:  # the teacher-forced pass saw the target: decode every row for real
        gens = [[] for _ in target_ids]
        todo = [(i, len(t)) for i, t in enumerate(target_ids) if t]
        preds = []
    for i, (target, pred) in enumerate(zip(target_ids, preds)):
        miss = next((j for j, (a, b) in enumerate(zip(pred, target)) if a != b), None)
        gen = list(target) if miss is None else list(target[:miss]) + [pred[miss]]
        gens.append(gen)
        if miss is not None and miss < len(target) - 1 and pred[miss] != eos:
            todo.append((i, len(target) - miss - 1))
    if todo:
        new = generate_from_ids(loaded, [prompt_ids[i] + gens[i] for i, _ in todo],
                                max_new_tokens=max(n for _, n in todo))
        for (i, n), ids in zip(todo, new):
            gens[i] += ids[:n]
    if eos is not None:
        gens = [g[: g.index(eos)] if eos in g else g for g in gens]
    return gens


def _decode(loaded: LoadedModel, ids: list[int]) -> str:
    return loaded.tokenizer.decode(ids, skip_special_tokens=True)


def item_baseline(loaded: LoadedModel, request: EditRequest) -> ItemBaseline:
    """The pre-edit model's behaviour on `request`'s locality probes (call on the unedited model)."""
    return item_baselines(loaded, [request], batch_size=1)[0]


def item_baselines(loaded: LoadedModel, requests: list[EditRequest], batch_size: int = 32) -> list[ItemBaseline]:
    """item_baseline of every request, the locality probes of `batch_size` requests at a time in
    one teacher-forced forward and one generate call (padding changes no argmax beyond float noise)."""
    out: list[ItemBaseline] = []
    for chunk in _chunks(requests, batch_size):
        missing = [p.prompt for r in chunk for p in r.locality if not p.answer]
        generated = iter(greedy_continuations(loaded, missing, max_new_tokens=5) if missing else [])
        # A probe with no answer is scored on the pre-edit model's own greedy continuation.
        answers = [[p.answer or (next(generated).strip() or "the") for p in r.locality] for r in chunk]
        prompts = [p.prompt for r in chunk for p in r.locality]
        _, preds, gens, _ = probe_rows(loaded, prompts, [a for item in answers for a in item])
        at = 0
        for request, item in zip(chunk, answers):
            n = len(item)
            out.append(ItemBaseline(item, [bool(p.answer) for p in request.locality], preds[at:at + n],
                                    gens[at:at + n]))
            at += n
    return out


def measure_item(loaded: LoadedModel, request: EditRequest, baseline: ItemBaseline,
                 portability: list | None = None) -> dict[str, float | None]:
    """Every figure for one edit under both definitions (None where the data has no probe).

    All the item's probes go through one teacher-forced batch and one generate call, so the
    same item is always computed the same way (before and after editing)."""
    return measure_items(loaded, [request], [baseline], batch_size=1, portability=[portability or []])[0]


def measure_items(loaded: LoadedModel, requests: list[EditRequest], baselines: list[ItemBaseline],
                  batch_size: int = 32, portability: list[list] | None = None) -> list[dict[str, float | None]]:
    """measure_item of every request, the probes of `batch_size` items at a time in one
    teacher-forced forward and one generate call: the same figures as item by item (up to float
    noise in an argmax tie), at a fraction of the cost."""
    portability = portability or [[] for _ in requests]
    items = [(_probes(r, b, p), b) for r, b, p in zip(requests, baselines, portability, strict=True)]
    rows: list[dict[str, float | None]] = []
    for chunk in _chunks(items, batch_size):
        flat = [probe for probes, _ in chunk for probe in probes]
        hits, preds, gens, _ = probe_rows(loaded, [p.prompt for p in flat], [p.target for p in flat])
        at = 0
        for probes, baseline in chunk:
            n = len(probes)
            rows.append(_scores(loaded, probes, baseline, hits[at:at + n], preds[at:at + n], gens[at:at + n]))
            at += n
    return rows


def _chunks(items: list, size: int) -> list[list]:
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    return [items[i:i + size] for i in range(0, len(items), size)]


def _probes(request: EditRequest, baseline: ItemBaseline, portability: list) -> list[Probe]:
    probes = [Probe("rel", request.prompt, request.target_new)]
    probes += [Probe("gen", r, request.target_new) for r in request.rephrases]
    probes += [Probe("loc", p.prompt, a) for p, a in zip(request.locality, baseline.answers)]
    probes += [Probe("port", p.prompt, p.answer) for p in portability if p.answer]
    return probes


def _scores(loaded: LoadedModel, probes: list[Probe], baseline: ItemBaseline, hits, preds, gens) -> dict[str, float | None]:
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


def journal_figures(figures: dict[str, float | None]) -> dict[str, float | None]:
    """What a journal entry records of an edit: every figure, and under the names the journal
    has always used, reliability / generalization / locality (teacher-forced)."""
    return {"reliability": figures["rel_tf"], "generalization": figures["gen_tf"], "locality": figures["loc_tf"],
            **figures}


def summarise(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Mean of each metric over the rows that have it."""
    return {k: mean(r.get(k) for r in rows) for k in METRICS}
