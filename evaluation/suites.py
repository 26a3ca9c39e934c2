"""Suites turn a dataset into edit cases (an EditRequest plus optional portability probes).
Registered through the plugin host so third-party plugins can add their own (hook:
register_suites; subclass Suite and implement `convert`, or override `read` entirely).

Built in:

- ``zsre``: zsRE in the MEND/EasyEdit JSON format: ``src`` (prompt), ``alt`` (new target),
  ``rephrase``, ``loc`` / ``loc_ans`` (an unrelated probe and its answer), optional ``subject``,
  ``answers`` (the old answer first) and ``portability`` ({"New Question", "New Answer"} or a
  list of them).
- ``counterfact``: CounterFact either in the MEND split format (``prompt``, ``target_new``,
  ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``,
  ``subject``) or in ROME's original format (``requested_rewrite`` with a ``{}`` prompt template,
  ``subject``, ``target_new.str``, ``target_true.str``; ``paraphrase_prompts``;
  ``neighborhood_prompts``, whose expected answer is the true target). Detected per record.
- ``jsonl``: the generic schema, one JSON object per line (or a JSON list), with the fields of
  ``editkit.EditRequest``: ``prompt`` and ``target_new`` (required), ``subject``, ``target_old``,
  ``rephrases`` (list of strings), ``locality`` (list of ``{"prompt", "answer"}``), plus an
  optional ``portability`` (list of ``{"prompt", "answer"}``: questions the edit should carry to).
- ``builtin``: editkit's own small counterfactual set (no data file).

Files load through ``datasets`` (``load_dataset("json", data_files=...)``); a name that is not a
local file is taken as a Hugging Face hub dataset (needs network). A malformed record raises
InvalidRequest naming its index and field, or with skip_invalid=True is skipped and counted.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ValidationError

from editkit.errors import InvalidRequest
from editkit.hookspecs import hookimpl
from editkit.schemas import EditRequest, LocalityProbe

from .builtin_edits import BUILTIN_EDITS


class RecordError(ValueError):
    """A record's field is missing or malformed (raised by Suite.convert)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class EditCase:
    """One edit to make and measure: the request, plus portability probes where the data has them."""

    request: EditRequest
    portability: tuple[LocalityProbe, ...] = ()
    index: int = 0  # position of the record in the source

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "request": self.request.model_dump(mode="json"),
                "portability": [p.model_dump(mode="json") for p in self.portability]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditCase":
        return cls(EditRequest.model_validate(data["request"]),
                   tuple(LocalityProbe.model_validate(p) for p in data.get("portability", [])),
                   int(data.get("index", 0)))


@dataclass
class SuiteData:
    cases: list[EditCase]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (record index, reason)
    total: int = 0  # records read

    @property
    def requests(self) -> list[EditRequest]:
        return [c.request for c in self.cases]


# ---- field helpers used by convert() ------------------------------------------------------
def text(record: dict, name: str, required: bool = True) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise RecordError(name, "is missing")
        return None
    if isinstance(value, list) and len(value) >= 1 and all(isinstance(v, str) for v in value):
        value = value[0]  # some releases wrap single answers in a list
    if not isinstance(value, str):
        raise RecordError(name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        if required:
            raise RecordError(name, "is empty")
        return None
    return value


def texts(record: dict, name: str) -> list[str]:
    value = record.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(name, "must be a string or a list of strings")
    return [v for v in value if v.strip()]


def probes(value: Any, name: str) -> list[LocalityProbe]:
    """A list of {"prompt", "answer"} objects (answer optional)."""
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(name, "must be a list of {prompt, answer} objects")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise RecordError(f"{name}[{i}]", "must be an object with 'prompt' and 'answer'")
        prompt = text(item, "prompt") if "prompt" in item else None
        if prompt is None:
            raise RecordError(f"{name}[{i}].prompt", "is missing")
        answer = item.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise RecordError(f"{name}[{i}].answer", "must be a string")
        out.append(LocalityProbe(prompt=prompt, answer=answer or None))
    return out


def build_request(**fields: Any) -> EditRequest:
    try:
        return EditRequest.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise RecordError(".".join(str(p) for p in err["loc"]) or "(record)", err["msg"]) from None


# ---- reading files ------------------------------------------------------------------------
def _json_records(path: Path) -> list[Any]:
    """Plain-JSON reading, used when datasets cannot build a table (mixed types in a column):
    it lets the per-record checks name the record and field at fault."""
    raw = path.read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
    except ValueError:
        data = []
        for line_no, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except ValueError as exc:
                raise InvalidRequest(f"{path}: line {line_no} is not valid JSON ({exc})") from None
    if isinstance(data, dict):
        for key in ("data", "records", "edits"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    if not isinstance(data, list):
        raise InvalidRequest(f"{path}: expected a JSON list of records or JSON lines")
    return data


def load_records(source: str | Path, split: str = "train") -> list[Any]:
    """Records of a local JSON/JSONL file (through datasets) or of a hub dataset."""
    import datasets

    path = Path(source)
    datasets.disable_progress_bars()
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="editkit-ds-") as cache:
            try:
                ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache,
                                           keep_in_memory=True)
                return ds.to_list()
            except Exception:  # mixed types or ragged records: fall back to per-record checks
                return _json_records(path)
    if path.suffix in (".json", ".jsonl") or path.exists() or str(source).startswith((".", "/")):
        raise InvalidRequest(f"data file {source} not found")
    try:
        return datasets.load_dataset(str(source), split=split).to_list()
    except Exception as exc:
        raise InvalidRequest(f"cannot load dataset '{source}' from the hub: {str(exc).splitlines()[0]}") from None


class Suite:
    """A named source of edit cases. Subclasses implement convert(record) -> EditCase
    (raising RecordError for a bad field), or override read() for other sources."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True

    def convert(self, record: dict[str, Any]) -> EditCase:
        raise NotImplementedError

    def records(self, path: str | Path) -> list[Any]:
        return load_records(path)

    def read(self, path: str | Path | None = None, limit: int | None = None,
             skip_invalid: bool = False) -> SuiteData:
        if path is None:
            raise InvalidRequest(f"suite '{self.name}' needs a data file (--data)")
        data = SuiteData([])
        for index, record in enumerate(self.records(path)):
            if limit is not None and len(data.cases) >= limit:
                break
            data.total += 1
            try:
                if not isinstance(record, dict):
                    raise RecordError("(record)", f"must be a JSON object, got {type(record).__name__}")
                case = self.convert(record)
            except RecordError as exc:
                reason = f"{self.name} record {index}: {exc}"
                if not skip_invalid:
                    raise InvalidRequest(reason + " (use --skip-invalid to skip bad records)") from None
                data.skipped.append((index, reason))
                continue
            data.cases.append(EditCase(case.request, case.portability, index))
        return data

    def load(self, path: str | Path | None = None, limit: int | None = None,
             skip_invalid: bool = False) -> list[EditRequest]:
        return self.read(path, limit, skip_invalid).requests


class BuiltinSuite(Suite):
    name = "builtin"
    description = "editkit's own small counterfactual edit set (no data files needed)"
    needs_data = False

    def records(self, path=None) -> list[Any]:
        return list(BUILTIN_EDITS)

    def read(self, path=None, limit=None, skip_invalid=False) -> SuiteData:
        return super().read(path or "(builtin)", limit, skip_invalid)

    def convert(self, record: dict[str, Any]) -> EditCase:
        return EditCase(build_request(**record))


def _portability(record: dict) -> list[LocalityProbe]:
    value = record.get("portability")
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and ("New Question" in item or "prompt" in item):
            q = item.get("New Question", item.get("prompt"))
            a = item.get("New Answer", item.get("answer", item.get("ground_truth")))
            if isinstance(a, list):
                a = a[0] if a and isinstance(a[0], str) else None
            if not isinstance(q, str) or not isinstance(a, str) or not q.strip():
                raise RecordError(f"portability[{i}]", "needs a question and a string answer")
            out.append(LocalityProbe(prompt=q, answer=a))
        elif item is not None:
            raise RecordError(f"portability[{i}]", "must be an object with a question and an answer")
    return out


class ZsreSuite(Suite):
    name = "zsre"
    description = "zsRE question answering edits (MEND/EasyEdit JSON: src, alt, rephrase, loc, loc_ans)"

    def convert(self, record: dict[str, Any]) -> EditCase:
        prompt = text(record, "src")
        target = text(record, "alt")
        loc = text(record, "loc", required=False)
        loc_ans = text(record, "loc_ans", required=False)
        if loc is not None and loc_ans is None:
            raise RecordError("loc_ans", "is missing (loc is given)")
        answers = texts(record, "answers")
        request = build_request(
            prompt=prompt, target_new=target, subject=text(record, "subject", required=False),
            target_old=answers[0] if answers else None, rephrases=texts(record, "rephrase"),
            locality=[{"prompt": loc, "answer": loc_ans}] if loc else [])
        return EditCase(request, tuple(_portability(record)))


class CounterFactSuite(Suite):
    name = "counterfact"
    description = "CounterFact counterfactual edits (MEND split format, or ROME's requested_rewrite format)"

    def convert(self, record: dict[str, Any]) -> EditCase:
        if "requested_rewrite" in record:
            return self._rome(record)
        loc = text(record, "locality_prompt", required=False)
        request = build_request(
            prompt=text(record, "prompt"), target_new=text(record, "target_new"),
            subject=text(record, "subject", required=False),
            target_old=text(record, "ground_truth", required=False),
            rephrases=texts(record, "rephrase_prompt"),
            locality=[{"prompt": loc, "answer": text(record, "locality_ground_truth", required=False)}] if loc else [])
        return EditCase(request, tuple(_portability(record)))

    @staticmethod
    def _rome(record: dict[str, Any]) -> EditCase:
        rw = record["requested_rewrite"]
        if not isinstance(rw, dict):
            raise RecordError("requested_rewrite", "must be an object")
        template = text(rw, "prompt")
        subject = text(rw, "subject")
        try:
            prompt = template.format(subject) if "{}" in template else template
        except (IndexError, KeyError, ValueError):
            raise RecordError("requested_rewrite.prompt", "must be a template with one {} for the subject") from None

        def target(name: str, required: bool) -> str | None:
            value = rw.get(name)
            if isinstance(value, dict):
                value = value.get("str")
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value.strip():
                raise RecordError(f"requested_rewrite.{name}.str", "is missing or empty")
            return value

        true = target("target_true", False)
        neighbours = texts(record, "neighborhood_prompts")
        request = build_request(
            prompt=prompt, target_new=target("target_new", True), subject=subject, target_old=true,
            rephrases=texts(record, "paraphrase_prompts"),
            locality=[{"prompt": p, "answer": true} for p in neighbours])
        return EditCase(request)


class JsonlSuite(Suite):
    name = "jsonl"
    description = ("generic JSONL: one EditRequest per line (prompt, target_new, subject, target_old, "
                   "rephrases, locality [{prompt, answer}]) plus optional portability [{prompt, answer}]")

    def convert(self, record: dict[str, Any]) -> EditCase:
        known = {"prompt", "target_new", "subject", "target_old", "rephrases", "locality", "portability"}
        extra = sorted(k for k, v in record.items() if k not in known and v is not None)
        if extra:
            raise RecordError(extra[0], f"is not a field of the generic schema (fields: {', '.join(sorted(known))})")
        request = build_request(
            prompt=text(record, "prompt"), target_new=text(record, "target_new"),
            subject=text(record, "subject", required=False), target_old=text(record, "target_old", required=False),
            rephrases=texts(record, "rephrases"),
            locality=[p.model_dump() for p in probes(record.get("locality"), "locality")])
        return EditCase(request, tuple(probes(record.get("portability"), "portability")))


BUILTIN_SUITES = (BuiltinSuite, ZsreSuite, CounterFactSuite, JsonlSuite)


@hookimpl
def register_suites(register):
    for suite in BUILTIN_SUITES:
        register(suite)
