"""Property-based tests (hypothesis) of the two ways edit requests come in: JSONL lines
through the CLI's parser (cli/edit.py: read_requests) and values through Session.edit. Any
input ends in a clean InvalidRequest that changes nothing, or in valid edits; never in
another exception. EDITKIT_PROPERTY_EXAMPLES sets the examples per test (default 150)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import FAST_FT, journal_rows
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from editkit.cli.edit import read_requests
from editkit.errors import InvalidRequest
from editkit.schemas import EditRequest
from editkit.session import Session

EXAMPLES = int(os.environ.get("EDITKIT_PROPERTY_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
KEYS = ["prompt", "target_new", "subject", "target_old", "rephrases", "locality"]

# Text: ordinary, any code point including lone surrogates, and a few chosen troublemakers
# (blank, line separators JSON allows raw, a NUL, over the 4000-character limit).
texts = st.one_of(
    st.text(max_size=30),
    st.text(st.characters(exclude_categories=()), max_size=30),
    st.sampled_from(["", " ", "\t\n", "a\u2028b", "a\x85b", "\x00", "\ud800", "x\udfff",
                     "The capital of France is", "Rome"]),
    st.integers(4001, 4100).map(lambda n: "p" * n),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(texts, inner, max_size=3)), max_leaves=8)
probes = st.one_of(st.fixed_dictionaries({"prompt": texts}, optional={"answer": st.one_of(st.none(), texts)}), values)
# Edit requests as JSON values: mostly the right shape with right or wrong field types,
# sometimes unknown keys, sometimes not an object at all.
requests = st.one_of(
    st.fixed_dictionaries({"prompt": texts, "target_new": texts},
                          optional={"subject": st.one_of(st.none(), texts), "target_old": st.one_of(st.none(), texts),
                                    "rephrases": st.one_of(st.lists(texts, max_size=3), values),
                                    "locality": st.one_of(st.lists(probes, max_size=2), values)}),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), texts), values, max_size=4),
    values,
)
valid_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)
valid_requests = st.fixed_dictionaries({"prompt": valid_text, "target_new": valid_text},
                                       optional={"rephrases": st.lists(valid_text, max_size=2)})


@st.composite
def lines(draw) -> str:
    """One JSONL line: a request as JSON (escaped or raw), one with a key given twice, deep
    nesting, a number over Python's 4300-digit limit, or not JSON."""
    kind = draw(st.sampled_from(["json", "raw", "duplicate", "text", "nested", "digits"]))
    if kind == "digits":
        return '{"prompt": "a", "target_new": ' + "9" * draw(st.integers(4000, 6000)) + "}"
    if kind in ("json", "raw"):
        return json.dumps(draw(requests), ensure_ascii=kind == "json")
    if kind == "duplicate":
        request = draw(valid_requests)
        key = draw(st.sampled_from(sorted(request)))
        body = json.dumps(request)[1:-1]
        return "{" + body + ", " + json.dumps(key) + ": " + json.dumps(request[key]) + "}"
    if kind == "nested":
        depth = draw(st.integers(1, 100_000))
        return "[" * depth + "]" * depth
    return draw(texts)


def outcome(fn):
    """('ok', value) or ('invalid', message); any other exception fails the test."""
    try:
        value = fn()
        event("ok")
        return "ok", value
    except InvalidRequest as exc:
        event("InvalidRequest")
        message = str(exc)
        assert message.strip() and "Traceback" not in message, message
        return "invalid", message


def write(lines_: list[str]) -> Path:
    fd, name = tempfile.mkstemp(suffix=".jsonl")
    with os.fdopen(fd, "wb") as fh:  # a raw lone surrogate is written as is: not UTF-8
        fh.write("\n".join(lines_).encode("utf-8", "surrogatepass") + b"\n")
    return Path(name)


@SETTINGS
@given(st.lists(lines(), min_size=1, max_size=4))
def test_jsonl_lines_parse_or_fail_cleanly(lines_):
    path = write(lines_)
    try:
        kind, result = outcome(lambda: read_requests(str(path)))
    finally:
        path.unlink()
    if kind == "ok":
        parsed = [line for line in "\n".join(lines_).split("\n") if line.strip()]
        assert [r.model_dump() for r in result] == [EditRequest.model_validate(json.loads(x)).model_dump()
                                                    for x in parsed]
    else:
        assert result.startswith((str(path), "cannot read")), result


@SETTINGS
@given(st.lists(valid_requests, min_size=1, max_size=3), st.data())
def test_valid_lines_are_read_and_a_repeated_key_is_named(requests_, data):
    good = [json.dumps(r, ensure_ascii=data.draw(st.booleans())) for r in requests_]
    path = write(good)
    try:
        assert read_requests(str(path)) == [EditRequest.model_validate(r) for r in requests_]
    finally:
        path.unlink()
    bad_line = data.draw(st.integers(0, len(good) - 1))
    key = data.draw(st.sampled_from(sorted(requests_[bad_line])))
    good[bad_line] = good[bad_line][:-1] + f", {json.dumps(key)}: \"again\"}}"
    path = write(good)
    try:
        with pytest.raises(InvalidRequest, match=f"line {bad_line + 1}: key '{key}' is given twice"):
            read_requests(str(path))
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def session(tiny_loaded, tmp_path_factory):
    ws = tmp_path_factory.mktemp("props") / "ws"
    with Session.open(ws, loaded=tiny_loaded["gpt2"], method="ft", method_config={**FAST_FT, "steps": 1}) as s:
        yield s


@torch.no_grad()
def logits(loaded):
    return loaded.model(loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids).logits


@settings(max_examples=max(EXAMPLES // 3, 10), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(requests, valid_requests, st.lists(st.one_of(requests, valid_requests), max_size=3)))
def test_session_edit_applies_or_refuses_cleanly(session, value):
    before, state = journal_rows(session.workspace), logits(session.loaded)
    kind, result = outcome(lambda: session.edit(value, measure=False))
    after = journal_rows(session.workspace)
    if kind == "invalid":
        assert after == before and torch.equal(logits(session.loaded), state), result
    else:
        assert len(after[0]) == len(before[0]) + len(result) and all(r.status == "applied" for r in result)
