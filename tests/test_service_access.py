"""The service's one access rule (editkit/access.py), checked on every route the app has:
each declares exactly one marker, and each request that changes state (or reads the
server's files) answers 401 without the token and changes nothing."""

from __future__ import annotations

import pytest
from conftest import TOKEN, journal_rows, served
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from editkit import access

AUTH = {"Authorization": f"Bearer {TOKEN}"}
TOKEN_MARKERS = {"changes_state", "reads_server_files"}
# Routes FastAPI adds itself: its schema and docs pages, read-only.
FRAMEWORK_ROUTES = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
# A valid body for each route that changes state only when a body field is set.
CONDITIONAL_BODIES = {"/v1/generate": {"prompts": ["The capital of France is"], "max_new_tokens": 1}}


def marker(route: APIRoute) -> str:
    """The route's one access marker (editkit.access.declared)."""
    names = access.declared(route)
    assert len(names) == 1, f"{sorted(route.methods)} {route.path} declares {names or 'no access marker'}; " \
                            "depend on exactly one of editkit.access's markers"
    return names[0]


def operations(app):
    for route in access.api_routes(app)[0]:
        if isinstance(route, APIRoute):
            for method in sorted(route.methods):
                yield method, route, route.path.replace("{edit_id}", "1").replace("{conversation}", "c1")


@pytest.fixture
def app_and_session(tiny_loaded, tmp_path):
    (tmp_path / "data").mkdir()
    with served(tmp_path / "ws", tiny_loaded["gpt2"], data_dir=str(tmp_path / "data")) as pair:
        yield pair


def test_every_route_declares_its_access(app_and_session):
    app, _ = app_and_session
    api, other = access.api_routes(app)
    assert {r.path for r in other} <= FRAMEWORK_ROUTES
    kinds = {(sorted(r.methods)[0], r.path): marker(r) for r in api}
    # The routes that exist today; a new route is covered by the loop below whatever it declares.
    assert kinds[("POST", "/v1/edits")] == kinds[("DELETE", "/v1/edits/{edit_id}")] == "changes_state"
    assert kinds[("DELETE", "/v1/conversations/{conversation}")] == "changes_state"
    assert kinds[("POST", "/v1/generate")] == "changes_state_when:conversation"
    assert kinds[("POST", "/v1/evaluate")] == "reads_server_files"
    for key in (("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/edits"), ("POST", "/v1/completions")):
        assert kinds[key] == "reads_state"


def test_changing_requests_need_the_token(app_and_session, monkeypatch, tmp_path):
    app, session = app_and_session
    client = TestClient(app)
    client.post("/v1/edits", json={"edits": [{"prompt": "The capital of France is", "target_new": "Rome"}]},
                headers=AUTH).raise_for_status()
    touched = []  # every conversation the session was asked to read, extend or clear
    decode, clear = session.decode, session.clear_conversation
    monkeypatch.setattr(session, "decode",
                        lambda rows, conversation=None, **kw: touched.append(conversation) or decode(rows, conversation, **kw))
    monkeypatch.setattr(session, "clear_conversation", lambda c: touched.append(c) or clear(c))

    checked = []
    for method, route, path in operations(app):
        kind = marker(route)
        if kind in TOKEN_MARKERS:
            requests = [{}]  # the token is checked before the body is read
        elif kind.startswith("changes_state_when:"):
            field = kind.split(":", 1)[1]
            assert route.path in CONDITIONAL_BODIES, f"add a valid body for {route.path} to CONDITIONAL_BODIES"
            requests = [{**CONDITIONAL_BODIES[route.path], field: "c1"}]
        else:
            continue
        for body in requests:
            before = journal_rows(tmp_path / "ws")
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}):
                r = client.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.json()["error"]["reason"] == "missing or wrong bearer token"
                assert r.headers["www-authenticate"] == "Bearer" and TOKEN not in r.text
            assert journal_rows(tmp_path / "ws") == before, (method, path)  # refused: nothing changed
            r = client.request(method, path, json=body, headers=AUTH)
            assert r.status_code != 401, (method, path, r.text)  # the token opens it
        checked.append((method, route.path))
    assert ("DELETE", "/v1/conversations/{conversation}") in checked and ("POST", "/v1/generate") in checked
    assert touched == ["c1", "c1"]  # only the two requests with the token reached a conversation


def test_reading_requests_need_no_token(app_and_session):
    app, _ = app_and_session
    client = TestClient(app)
    assert client.post("/v1/generate", json=CONDITIONAL_BODIES["/v1/generate"]).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
    for path in ("/health", "/metrics", "/v1/edits"):
        assert client.get(path).status_code == 200


def test_without_a_token_everything_is_open(tiny_loaded, tmp_path):
    with served(tmp_path / "ws", tiny_loaded["gpt2"], token=None) as (app, _):
        client = TestClient(app)
        assert client.delete("/v1/conversations/c1").json() == {"conversation": "c1", "cleared": True}
        body = {**CONDITIONAL_BODIES["/v1/generate"], "conversation": "c1"}
        assert client.post("/v1/generate", json=body).status_code == 200


def test_the_token_is_never_in_the_config_repr():
    from editkit.service import ServiceConfig

    assert TOKEN not in repr(ServiceConfig(token=TOKEN))
