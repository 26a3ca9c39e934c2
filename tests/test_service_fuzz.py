"""Property-based tests of the HTTP API from its own OpenAPI schema (schemathesis): every
operation gets generated requests, valid and invalid, against an app over a tiny model.

For each response: no 5xx; an error is JSON with a reason; no body holds a traceback or a
server directory; after a 4xx, or after any request to a route that declares it changes
nothing, the journal is as before. EDITKIT_FUZZ_EXAMPLES sets the examples per operation
(default 20); `pytest --hypothesis-show-statistics` counts them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import schemathesis
from conftest import TOKEN, journal_rows, served
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from editkit.access import api_routes, declared

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("EDITKIT_FUZZ_EXAMPLES", "20"))
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api(tiny_loaded, tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    data.mkdir()
    (data / "edits.jsonl").write_text(json.dumps({"prompt": "The capital of France is", "target_new": "Rome"}) + "\n")
    # Small caps keep each generated request cheap: edits train 2 FT steps on a 4-layer model.
    with served(root / "ws", tiny_loaded["gpt2"], data_dir=str(data), max_new_tokens=8, max_batch=4,
                max_body_bytes=20_000) as (app, _):
        kinds = {(method, r.path): declared(r) for r in api_routes(app)[0] for method in r.methods}
        paths = {str(root), str(Path(tiny_dirs["gpt2"]).parent), str(ROOT), sys.prefix}
        yield {"app": app, "workspace": root / "ws", "kinds": kinds, "paths": paths}


def check(case, api) -> int:
    before = journal_rows(api["workspace"])
    response = case.call(headers=AUTH)
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:500]}"
    text = response.text
    for path in api["paths"]:
        assert path not in text, f"{where}: the body names the server directory {path}: {text[:500]}"
    assert "Traceback" not in text and 'File "' not in text, f"{where}: traceback in {text[:500]}"
    if response.status_code >= 400:
        assert response.headers["content-type"][0].startswith("application/json"), where
        error = response.json()["error"]
        assert error["status"] == response.status_code and error["reason"].strip(), (where, error)
    if response.status_code >= 400 or api["kinds"][(case.method, case.path)] == ["reads_state"]:
        assert journal_rows(api["workspace"]) == before, f"{where} -> {response.status_code} changed the journal"
    return response.status_code


def fuzz(operation, mode: GenerationMode, api) -> dict[int, int]:
    """Run `check` on generated cases of one operation; return how many got each status."""
    ran: dict[int, int] = {}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case):
        status = check(case, api)
        ran[status] = ran.get(status, 0) + 1

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        # no invalid request exists for an operation without parameters or body (GET /health)
    return ran


def test_every_operation(api):
    """Each operation of the schema, with data that fits it (positive) and data that does not
    (negative). Operations are read from the schema, so a new route is fuzzed as it appears.
    (schemathesis.pytest.from_fixture would give one test per operation, but its lazy loader
    sets a pytest attribute that pytest 9 no longer has.)"""
    schema = schemathesis.openapi.from_asgi("/openapi.json", api["app"])
    counts: dict[str, dict[int, int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = f"{operation.method.upper()} {operation.path} {mode.value}"
            counts[key] = fuzz(operation, mode, api)
    total = sum(n for statuses in counts.values() for n in statuses.values())
    print(f"\nschemathesis: {total} cases; statuses per operation and mode:\n{json.dumps(counts, indent=1)}")
    assert {k.rsplit(" ", 1)[0] for k in counts} >= {"POST /v1/edits", "DELETE /v1/edits/{edit_id}", "POST /v1/generate",
                                                      "DELETE /v1/conversations/{conversation}", "POST /v1/evaluate"}
    assert all(statuses for key, statuses in counts.items() if key.endswith("positive")), counts
    assert counts["POST /v1/edits positive"].get(200), "no generated edit went through"
