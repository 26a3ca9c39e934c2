"""How the service answers what goes wrong: every error is JSON with a reason, no reason
names a server directory (they are redacted), and an unexpected error is logged with a
request id, which is all the response gives."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from editkit.access import Unauthorized
from editkit.errors import EditkitError, EditVetoed, InvalidRequest, UnknownComponent, WorkspaceError
from editkit.limits import TextError

from .config import ApiError

log = logging.getLogger("editkit.service")
_STATUS = [(EditVetoed, 409), (UnknownComponent, 404), (InvalidRequest, 422), (WorkspaceError, 409),
           (EditkitError, 400)]


def safe(text: str) -> str:
    """`text` as UTF-8 can carry it (a lone surrogate from the request becomes \\udXXX)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, reason: str, fields: list[dict] | None = None, **extra: Any) -> JSONResponse:
    """{"error": {status, reason, ...}}; `message` and `type` repeat it as OpenAI clients read it."""
    kind = "server_error" if status >= 500 else "authentication_error" if status == 401 else "invalid_request_error"
    body: dict[str, Any] = {"error": {"status": status, "reason": safe(reason), "message": safe(reason),
                                      "type": kind, **extra}}
    if fields:
        body["error"]["fields"] = [{k: safe(str(v)) for k, v in f.items()} for f in fields]
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def redactor(directories: dict[str, Any]):
    """A function that replaces each server directory (absolute, as given or resolved) in a
    text with its placeholder, longest first."""
    pairs = []
    for placeholder, directory in directories.items():
        if directory and (Path(directory).is_absolute() or Path(directory).exists()):
            for form in {str(Path(directory).absolute()), str(Path(directory).resolve())}:
                pairs.append((form, placeholder))
    pairs.sort(key=lambda p: -len(p[0]))

    def redact(text: str) -> str:
        for form, placeholder in pairs:
            text = text.replace(form, placeholder)
        return text

    return redact


def install_handlers(app: FastAPI, redact) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return error_response(exc.status, redact(exc.reason), exc.fields)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_, exc: Unauthorized):
        return error_response(401, str(exc))

    @app.exception_handler(EditkitError)
    async def _editkit_error(_, exc: EditkitError):
        status = next(code for cls, code in _STATUS if isinstance(exc, cls))
        fields = [{"field": exc.field, "reason": exc.reason}] if isinstance(exc, TextError) else None
        return error_response(status, redact(str(exc)), fields)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        fields = [{"field": ".".join(str(p) for p in e["loc"] if p != "body"),
                   "reason": e["msg"].removeprefix("Value error, ")} for e in exc.errors()]
        return error_response(422, "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        request_id = uuid.uuid4().hex
        log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error; the server log has the details under request id {request_id}",
                              request_id=request_id)


class BodyLimit:
    """ASGI middleware: read the request body before the app does and refuse it (413) when it
    is over the limit, whether declared (content-length) or streamed (chunked)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"request body over {self.limit} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            if pending:
                return pending.pop()
            return await receive()  # after the body: the client's disconnect, for streaming responses

        await self.app(scope, replay, send)
