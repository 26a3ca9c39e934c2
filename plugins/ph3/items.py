"""Knowledge-conflict items: a fact the loaded model knows, stated with a different answer
first ("The capital of France is Rome. The capital of France is"), plus the matching
reference prompt that states the true answer instead, so the two runs differ only in the
context's answer."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from editkit.errors import InvalidRequest
from editkit.model import LoadedModel
from editkit.tokens import target_text

SOURCES = ("builtin", "known", "counterfact")


@dataclass(frozen=True)
class Fact:
    prompt: str  # "The capital of France is"
    answer: str  # what is true (and what the model should know): "Paris"
    relation: str = ""
    subject: str = ""
    context_answer: str | None = None  # a conflicting answer; None: picked from another fact


@dataclass(frozen=True)
class ConflictItem:
    prompt: str
    memory_answer: str
    context_answer: str
    memory_token: int  # first token of the memorised answer (as it continues the prompt)
    context_token: int  # first token of the context's answer
    conflict_prompt: str  # context states context_answer, then the prompt again
    reference_prompt: str  # context states memory_answer, then the prompt again
    suffix_tokens: int  # trailing tokens the two prompts share (the repeated prompt)
    relation: str = ""
    subject: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ConflictItem":
        return cls(**data)


def statement(prompt: str, answer: str) -> str:
    """'The capital of France is' + 'Rome' -> 'The capital of France is Rome.'"""
    return prompt + target_text(prompt, answer).rstrip() + "."


def conflict_text(prompt: str, context_answer: str) -> str:
    return f"{statement(prompt, context_answer)} {prompt}"


# ---- sources ---------------------------------------------------------------------------
def _read_records(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"{path} is not valid JSON{'L' if path.suffix == '.jsonl' else ''}: {exc}") from None
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InvalidRequest(f"{path} must hold a list of JSON objects")
    return records


def _field(record: dict, index: int, names: tuple[str, ...], required: bool = True) -> str | None:
    for name in names:
        value = record.get(name)
        if isinstance(value, dict):  # ROME's {"str": ...}
            value = value.get("str")
        if isinstance(value, str) and value.strip():
            return value.strip()
    if required:
        raise InvalidRequest(f"record {index} has no {' / '.join(names)} (a non-empty string)")
    return None


def facts_from_records(records: list[dict]) -> list[Fact]:
    """Known-facts (prompt, attribute, relation_id), CounterFact (prompt, ground_truth,
    target_new) or the generic schema (prompt, answer, optional context_answer, relation)."""
    facts = []
    for i, r in enumerate(records):
        prompt = _field(r, i, ("prompt",))
        if "{}" in prompt and r.get("subject"):
            prompt = prompt.replace("{}", r["subject"])
        facts.append(Fact(
            prompt=prompt,
            answer=_field(r, i, ("answer", "attribute", "ground_truth", "target_true")),
            relation=_field(r, i, ("relation", "relation_id"), required=False) or "",
            subject=_field(r, i, ("subject",), required=False) or "",
            context_answer=_field(r, i, ("context_answer", "target_new"), required=False)))
    return facts


def load_facts(source: str) -> list[Fact]:
    """'builtin', 'known', 'counterfact' (files under ../shared/data) or a JSON / JSONL path."""
    if source == "builtin":
        from .facts import FACTS

        return [Fact(prompt=p, answer=a, relation=rel, subject=s) for rel, s, p, a in FACTS]
    if source == "counterfact":  # CounterFact through its suite: the fact is the true answer
        from editkit.data import shared_file
        from editkit.host import get_host

        data = get_host().suite("counterfact")().read(str(shared_file("counterfact")), None, skip_invalid=True)
        return [Fact(prompt=r.prompt.strip(), answer=r.target_old.strip(), relation="",
                     subject=(r.subject or "").strip(), context_answer=r.target_new.strip())
                for r in data.requests if r.target_old]
    if source == "known":  # ROME's known facts: a fact format, not an edit suite
        from editkit.data import shared_file

        return facts_from_records(_read_records(shared_file("known")))
    path = Path(source)
    if not path.exists():
        raise InvalidRequest(f"--items must be one of {', '.join(SOURCES)} or an existing JSON/JSONL file, "
                             f"got '{source}'")
    return facts_from_records(_read_records(path))


# ---- building items --------------------------------------------------------------------
def first_token(tokenizer, prompt: str, answer: str) -> int:
    ids = tokenizer(target_text(prompt, answer), add_special_tokens=False).input_ids
    if not ids:
        raise InvalidRequest(f"answer {answer!r} encodes to no tokens")
    return ids[0]


def _suffix_tokens(tokenizer, a: str, b: str) -> int:
    ia, ib = tokenizer(a).input_ids, tokenizer(b).input_ids
    n = 0
    while n < min(len(ia), len(ib)) and ia[-1 - n] == ib[-1 - n]:
        n += 1
    return n


def known_mask(loaded: LoadedModel, facts: list[Fact], batch_size: int = 64) -> list[bool]:
    """For each fact: does the model's greedy continuation of the prompt start with the whole
    answer? Checked teacher-forced (the argmax at every answer position is the answer's token),
    which is the same test as greedy decoding, in one forward pass per batch."""
    from editkit.scoring import teacher_forced_accuracy

    out = []
    for start in range(0, len(facts), batch_size):
        chunk = facts[start:start + batch_size]
        acc = teacher_forced_accuracy(loaded, [f.prompt for f in chunk], [f.answer for f in chunk])
        out.extend(a == 1.0 for a in acc)
    return out


def build_items(loaded: LoadedModel, source: str | list[Fact] = "builtin", limit: int | None = None,
                seed: int = 0, stats: dict | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[ConflictItem]:
    """Conflict items from facts the loaded model knows (its greedy answer to the clean prompt
    is the fact's answer), in source order, at most `limit`. A fact without its own conflicting
    answer borrows one from another fact of the same relation (any fact when no relation is
    given) whose answer starts with a different token. `stats` (if given) receives the counts."""
    facts = load_facts(source) if isinstance(source, str) else list(source)
    if not facts:
        raise InvalidRequest("no facts to build conflict items from")
    tok = loaded.tokenizer
    rng = random.Random(seed)
    by_relation: dict[str, list[str]] = {}
    for f in facts:
        by_relation.setdefault(f.relation, [])
        if f.answer not in by_relation[f.relation]:
            by_relation[f.relation].append(f.answer)
    items: list[ConflictItem] = []
    considered = known = 0
    batch = 64
    for start in range(0, len(facts), batch):
        if limit is not None and len(items) >= limit:
            break
        chunk = facts[start:start + batch]
        considered += len(chunk)
        for fact, ok in zip(chunk, known_mask(loaded, chunk, batch)):
            if not ok or (limit is not None and len(items) >= limit):
                continue
            known += 1
            item = _make_item(tok, fact, by_relation.get(fact.relation, []), rng)
            if item is not None:
                items.append(item)
        if progress:
            progress(min(start + batch, len(facts)), len(facts))
    if stats is not None:
        stats.update(source=source if isinstance(source, str) else "facts", considered=considered,
                     known=known, items=len(items))
    return items


def _make_item(tok, fact: Fact, pool: list[str], rng: random.Random) -> ConflictItem | None:
    memory_token = first_token(tok, fact.prompt, fact.answer)
    if fact.context_answer is not None:
        context = fact.context_answer
    else:
        options = [a for a in pool if first_token(tok, fact.prompt, a) != memory_token]
        if not options:
            return None
        context = rng.choice(options)
    context_token = first_token(tok, fact.prompt, context)
    if context_token == memory_token:
        return None  # the two answers cannot be told apart by their first token
    conflict, reference = conflict_text(fact.prompt, context), conflict_text(fact.prompt, fact.answer)
    return ConflictItem(prompt=fact.prompt, memory_answer=fact.answer, context_answer=context,
                        memory_token=memory_token, context_token=context_token, conflict_prompt=conflict,
                        reference_prompt=reference, suffix_tokens=max(1, _suffix_tokens(tok, conflict, reference)),
                        relation=fact.relation, subject=fact.subject)


def split_items(items: list[ConflictItem], seed: int = 0,
                fractions: tuple[float, float, float] = (0.4, 0.3, 0.3)) -> dict[str, list[ConflictItem]]:
    """Seeded, non-overlapping 'locate' / 'validation' / 'test' splits."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise InvalidRequest("split fractions must be three non-negative numbers")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    total = sum(fractions)
    n_locate = int(round(len(items) * fractions[0] / total))
    n_val = int(round(len(items) * fractions[1] / total))
    parts = {"locate": order[:n_locate], "validation": order[n_locate:n_locate + n_val],
             "test": order[n_locate + n_val:]}
    return {name: [items[i] for i in idx] for name, idx in parts.items()}
