"""Bad input to the service gets a 4xx JSON error with a reason, never a 500, and no error
body names a server directory or carries a traceback (issue 13's list)."""

from __future__ import annotations

import logging

import pytest
from conftest import TOKEN, journal_rows, served
from fastapi.testclient import TestClient

AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def client(tiny_loaded, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.jsonl").write_text('{"prompt": "a", "target_new": "b"}\n{"prompt":\n')
    with served(tmp_path / "ws", tiny_loaded["gpt2"], data_dir=str(data), max_body_bytes=20000) as (app, _):
        yield TestClient(app, raise_server_exceptions=False)


def error(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    reason = response.json()["error"]["reason"]
    for word in words:
        assert word in reason, reason
    assert "Traceback" not in response.text and "/tmp" not in response.text and "/work" not in response.text
    return reason


def test_bad_input_is_a_4xx_with_a_reason(client, tmp_path):
    before = journal_rows(tmp_path / "ws")
    prompt = {"prompts": ["The capital of France is"], "max_new_tokens": 1}
    for seed in (2**63, 2**64, -1):
        error(client.post("/v1/generate", json={**prompt, "seed": seed}), 422, "seed")
        error(client.post("/v1/completions", json={"prompt": "a", "seed": seed}), 422, "seed")
    assert client.post("/v1/generate", json={**prompt, "seed": 2**63 - 1, "temperature": 1}).status_code == 200

    surrogate = '"a\\ud800b"'  # JSON allows it; no tokenizer or journal can hold it
    for path, body, field in [
        ("/v1/generate", '{"prompts": [%s]}', "prompts.0"),
        ("/v1/completions", '{"prompt": %s}', "prompt.0"),
        ("/v1/completions", '{"prompt": ["ok", %s]}', "prompt.1"),
        ("/v1/completions", '{"prompt": "a", "model": %s}', "model"),
        ("/v1/edits", '{"edits": [{"prompt": "a b", "target_new": %s}]}', "edits.0.target_new"),
        ("/v1/edits", '{"edits": [{"prompt": "a b", "target_new": "c", "rephrases": [%s]}]}', "edits.0.rephrases.0"),
    ]:
        r = client.post(path, content=(body % surrogate).encode(), headers={**JSON, **AUTH})
        assert error(r, 422, field, "not valid Unicode")
        assert r.json()["error"]["fields"][0]["field"] == field

    # Found by the schemathesis run: a tiny temperature overflowed sampling, and a prompt past
    # the model's context (128 positions here) failed inside GPT-2's position embedding.
    error(client.post("/v1/generate", json={**prompt, "temperature": 1e-30}), 422, "temperature")
    long = "the quick brown fox " * 30
    error(client.post("/v1/generate", json={"prompts": [long]}), 422, "over the model's context of 128 tokens")
    error(client.post("/v1/edits", json={"edits": [{"prompt": long, "target_new": "b"}]}, headers=AUTH),
          422, "prompt + target_new", "over the model's context")
    error(client.post("/v1/completions", json={"prompt": []}), 422, "prompt", "at least one")
    error(client.post("/v1/generate", json={"prompts": []}), 422, "prompts")
    error(client.post("/v1/generate", json={"prompts": ["x" * 4001]}), 422, "prompts.0", "longer than 4000")
    error(client.post("/v1/edits", json={"edits": [{"prompt": "a", "target_new": "b" * 4001}]}, headers=AUTH),
          422, "edits.0.target_new", "longer than 4000")
    error(client.delete(f"/v1/edits/{2**70}", headers=AUTH), 422, "edit_id")
    error(client.delete("/v1/conversations/a%20b", headers=AUTH), 422, "conversation")

    # A streamed (chunked) body over the limit is 413, as a declared one is.
    error(client.post("/v1/generate", content=iter([b'{"prompts": ["', b"a" * 30000, b'"]}']), headers=JSON),
          413, "over 20000 bytes")
    error(client.post("/v1/generate", content=b'{"prompts": ["' + b"a" * 30000 + b'"]}', headers=JSON), 413)
    streamed = client.post("/v1/generate", content=iter([b'{"prompts": ["a"],', b' "max_new_tokens": 1}']), headers=JSON)
    assert streamed.status_code == 200 and len(streamed.json()["completions"]) == 1
    assert journal_rows(tmp_path / "ws") == before


def test_evaluate_never_shows_a_server_path(client, tmp_path):
    for data in ("/".join(["a"] * 3000), "a\x00b", "../../etc/passwd", "/etc/passwd", "missing.json", "."):
        r = client.post("/v1/evaluate", json={"suite": "zsre", "data": data}, headers=AUTH)
        assert error(r, 422, "data") == "data: not a file inside the server's data directory"
    r = client.post("/v1/evaluate", json={"suite": "jsonl", "data": "broken.jsonl"}, headers=AUTH)
    reason = error(r, 422, "<data>/broken.jsonl", "line 2")  # the data directory is named, not shown
    assert str(tmp_path) not in reason


def test_an_unexpected_error_is_logged_with_an_id_and_hidden(client, monkeypatch, caplog):
    session = client.app.state.session

    def broken(*args, **kwargs):
        raise RuntimeError(f"cannot open {session.workspace.resolve()}/secret.bin")

    monkeypatch.setattr(session, "decode", broken)
    with caplog.at_level(logging.ERROR, logger="editkit.service"):
        r = client.post("/v1/generate", json={"prompts": ["a"]})
    reason = error(r, 500, "internal error", "request id")
    request_id = r.json()["error"]["request_id"]
    assert request_id in reason and "secret.bin" not in r.text and "RuntimeError" not in r.text
    (record,) = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert "POST /v1/generate" in record.getMessage() and "secret.bin" in str(record.exc_info[1])


def test_the_service_names_a_local_model_without_its_path(client):
    health = client.get("/health").json()
    assert health["model"] == "gpt2" and "/" not in health["model"]
    completion = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).json()
    assert completion["model"] == "gpt2"
