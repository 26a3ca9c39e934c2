"""The OpenAI-compatible endpoints through the `openai` client: models, completions and chat
completions, streamed and not; fields editkit does not support are refused, not dropped; and
the Prometheus metrics the service exports."""

from __future__ import annotations

import pytest
from conftest import TOKEN, served
from fastapi.testclient import TestClient

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture
def client(tmp_path, tiny_loaded):
    from openai import OpenAI

    loaded = tiny_loaded["llama"]
    old = getattr(loaded.tokenizer, "chat_template", None)
    loaded.tokenizer.chat_template = CHAT_TEMPLATE
    try:
        with served(tmp_path / "ws", loaded) as (app, session):
            with TestClient(app) as http:
                yield OpenAI(base_url="http://testserver/v1", api_key=TOKEN, http_client=http), http, session
    finally:
        loaded.tokenizer.chat_template = old


def test_completions_streamed_and_not(client):
    api, _, session = client
    assert [m.id for m in api.models.list().data] == ["llama"]
    prompt = "The capital of France is"
    expected = session.generate([prompt], max_new_tokens=6)[0]
    whole = api.completions.create(model="llama", prompt=prompt, max_tokens=6, temperature=0)
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 6 and whole.usage.prompt_tokens > 0
    parts = list(api.completions.create(model="llama", prompt=prompt, max_tokens=6, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == expected
    assert parts[-1].choices[0].finish_reason == "length" and len(parts) > 2  # token by token
    stop = expected[2:4]
    cut = api.completions.create(model="llama", prompt=prompt, max_tokens=6, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[: expected.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(api.completions.create(model="llama", prompt=prompt, max_tokens=6, temperature=0, stop=[stop],
                                           stream=True))
    assert "".join(p.choices[0].text for p in streamed) == cut.choices[0].text  # the stop string is never sent


def test_chat_completions_apply_the_template(client):
    api, _, session = client
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"}]
    expected = session.generate([session.chat_prompt(messages)], max_new_tokens=5)[0]
    reply = api.chat.completions.create(model="llama", messages=messages, max_tokens=5, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == expected
    chunks = list(api.chat.completions.create(model="llama", messages=messages, max_completion_tokens=5,
                                              temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_unsupported_fields_are_refused(client):
    import openai

    api, http, _ = client
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model="llama", prompt="a", max_tokens=2, logprobs=2)
    assert "logprobs: not supported by editkit" in str(info.value)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                               "tools": [], "frequency_penalty": 1})
    assert r.status_code == 400 and r.json()["error"]["reason"].startswith("frequency_penalty, tools: not supported")
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 422


def test_prometheus_metrics(client):
    api, http, _ = client
    api.completions.create(model="llama", prompt="a", max_tokens=2)
    http.post("/v1/edits", json={"edits": [{"prompt": "The capital of France is", "target_new": "Rome"}]},
              headers={"Authorization": f"Bearer {TOKEN}"}).raise_for_status()
    text = http.get("/metrics").text
    for name in ("editkit_edit_latency_seconds_bucket", "editkit_generation_latency_seconds_bucket",
                 "editkit_batch_rows_bucket", "editkit_batch_wait_seconds_count", "editkit_generated_tokens_total",
                 "editkit_edits_applied_total 1.0", "process_resident_memory_bytes",
                 'editkit_http_requests_total{method="POST",route="/v1/completions",status="200"} 1.0'):
        assert name in text, name
