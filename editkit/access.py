"""The HTTP service's one access rule: a request that changes state (the journal, the
interventions, a conversation's memory) needs the bearer token when the server has one; a
request that changes nothing does not.

Every route declares which it is by depending on exactly one marker below, and the marker
is also what enforces it: `changes_state` (every request changes state), `reads_state`
(none does) or `changes_state_when(Body, field)` (a request changes state when `field` of
its body is set, e.g. /v1/generate with a conversation). One route reads without changing
anything yet takes the token too: `reads_server_files` (/v1/evaluate reads suite files from
the server's data directory). tests/test_service_access.py walks the app's routes: a route
without exactly one marker, or a request that needs the token answered without it, fails
it. Tokens are compared in constant time and never logged."""

# No `from __future__ import annotations`: FastAPI reads the body model of the dependency that
# changes_state_when builds from its (evaluated) annotation.

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

_bearer = HTTPBearer(auto_error=False, description="The server's token (`editkit serve --token`).")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


class Unauthorized(Exception):
    """A request that changes state came without the right token (answered 401)."""


def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> None:
    expected = request.app.state.config.token
    if not expected:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8")):
        raise Unauthorized("missing or wrong bearer token")


def changes_state(request: Request, credentials: Credentials) -> None:
    """Route marker: every request changes state, so each needs the token."""
    require_token(request, credentials)


def reads_server_files(request: Request, credentials: Credentials) -> None:
    """Route marker: changes nothing but reads files on the server, so it needs the token."""
    require_token(request, credentials)


def reads_state() -> None:
    """Route marker: no request changes state; anyone who can reach the server may call it."""


def changes_state_when(body_model: type[BaseModel], field: str):
    """Route marker and body dependency: a request changes state when `field` of its body
    (a `body_model`) is set; then it needs the token. The route takes its body from it:
    `body: Annotated[Model, Depends(changes_state_when(Model, "field"))]`."""

    def dependency(request: Request, body: body_model, credentials: Credentials) -> Any:
        if getattr(body, field) is not None:
            require_token(request, credentials)
        return body

    dependency.changes_state_when = field
    return dependency


def api_routes(app) -> tuple[list, list]:
    """(the app's API routes, including those of routers it includes; its other routes, such as
    the OpenAPI document and /docs), for walking every route."""
    from fastapi.routing import APIRoute

    api, other, pending = [], [], list(app.routes)
    while pending:
        route = pending.pop(0)
        if isinstance(route, APIRoute):
            api.append(route)
        elif hasattr(route, "original_router"):  # a router included with include_router
            pending.extend(route.original_router.routes)
        else:
            other.append(route)
    return api, other


def declared(route) -> list[str]:
    """The access markers a FastAPI route depends on, by name ('changes_state_when:FIELD'
    for the conditional one). A route must declare exactly one (the tests check each)."""
    markers = {changes_state: "changes_state", reads_server_files: "reads_server_files",
               reads_state: "reads_state"}
    found, pending = [], [route.dependant]
    while pending:
        dependant = pending.pop()
        pending.extend(dependant.dependencies)
        if dependant.call in markers:
            found.append(markers[dependant.call])
        elif hasattr(dependant.call, "changes_state_when"):
            found.append(f"changes_state_when:{dependant.call.changes_state_when}")
    return sorted(found)
