"""The HTTP service: serve the edited model and take edits while serving (FastAPI).

Concurrency: generations share a read lock and run together; edits and rollbacks take the
write lock, so a generation sees the state before or after an edit, never half of one.
Health and metrics take no lock. Durability comes from the Session: an edit is journaled
(committed) before the response acknowledges it.

Access: every route declares whether it changes state (editkit.access); those that do need
the bearer token when one is set. Errors: every error is JSON with a reason, and no reason
names a server directory (they are redacted) or carries a traceback (an unexpected error is
logged with a request id, and the response gives only the id)."""

# No `from __future__ import annotations`: FastAPI reads each route's body model from its
# annotation, and the capped models are local to create_app.
import ipaddress
import logging
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from editkit.access import Unauthorized, changes_state, changes_state_when, reads_server_files, reads_state
from editkit.errors import (EditkitError, EditVetoed, InvalidRequest, UnknownComponent,
                            WorkspaceError)
from editkit.limits import NOT_BLANK_SCHEMA, MAX_SEED, NonBlank, Text, TextError, check_texts, max_prompt_chars
from editkit.rwlock import RWLock
from editkit.schemas import EditRequest
from editkit.session import CONVERSATION_ID, Session
from editkit.store import Journal

log = logging.getLogger("editkit.service")
MAX_ID = 2**63 - 1  # journal ids are SQLite integers
CONVERSATION = f"^{CONVERSATION_ID.pattern}$"  # JSON Schema patterns search; this one must match whole


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str | None = Field(None, repr=False, description=(
        "Bearer token required by every request that changes state; none: open."))
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest request body accepted (413 above).")
    max_prompt_chars: int = Field(default_factory=max_prompt_chars, ge=1, description=(
        "Longest prompt or target accepted (422 above); default $EDITKIT_MAX_PROMPT_CHARS, else 4000."))
    max_new_tokens: int = Field(512, ge=1, description="Most tokens one generation may ask for.")
    max_batch: int = Field(64, ge=1, description="Most prompts or edits in one request.")
    data_dir: str | None = Field(None, description="Directory /v1/evaluate may read suite files from.")


class ApiError(Exception):
    def __init__(self, status: int, reason: str, fields: list[dict] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.fields = status, reason, fields or []


# ---- request bodies ----------------------------------------------------------------------
class EditBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    edits: list[EditRequest] = Field(min_length=1, description="Edit requests, applied in order.")


NOT_BLANK = Field(json_schema_extra=NOT_BLANK_SCHEMA)
Seed = Annotated[int | None, Field(ge=0, le=MAX_SEED, description="Seed for sampling (0 to 2^63-1).")]


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: list[NonBlank] = Field(min_length=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed = None
    conversation: str | None = Field(None, pattern=CONVERSATION, description=(
        "Conversation id: components with per-conversation memory (reweave) read and extend it; "
        "such a request changes state, so it needs the token."))


class CompletionBody(BaseModel):
    """The OpenAI /v1/completions fields editkit honours."""
    model_config = ConfigDict(extra="ignore")
    model: Text | None = None
    # Plain strings (the handler checks each): a union of validated types would name its members in errors.
    prompt: Annotated[str, NOT_BLANK] | list[Annotated[str, NOT_BLANK]] = Field(
        description="One prompt or a list of them.")
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="Only one choice per prompt is supported.")
    stop: str | list[str] | None = None  # only compared with the output, never tokenized or echoed
    seed: Seed = None


class EvaluateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    suite: Text = "builtin"
    data: Text | None = Field(None, description="Suite file, relative to the server's data directory.")
    limit: int | None = Field(None, ge=1)


def capped_bodies(config: ServiceConfig) -> tuple[type[EditBatch], type[GenerateBody], type[CompletionBody]]:
    """The request bodies with this server's caps (batch size, new tokens) in their schema,
    so pydantic enforces them and the OpenAPI document states them."""
    tokens = config.max_new_tokens
    edits = create_model("EditBatch", __base__=EditBatch, edits=(list[EditRequest], Field(
        min_length=1, max_length=config.max_batch, description="Edit requests, applied in order.")))
    generate = create_model(
        "GenerateBody", __base__=GenerateBody,
        prompts=(list[NonBlank], Field(min_length=1, max_length=config.max_batch)),
        max_new_tokens=(int, Field(min(32, tokens), ge=1, le=tokens)))
    completion = create_model("CompletionBody", __base__=CompletionBody,
                              max_tokens=(int, Field(min(16, tokens), ge=1, le=tokens)))
    return edits, generate, completion


# ---- metrics ------------------------------------------------------------------------------
class Metrics:
    """Counters for /metrics, in the Prometheus text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self.values: dict[str, float] = {
            "editkit_edits_applied_total": 0, "editkit_edits_rolled_back_total": 0,
            "editkit_edit_latency_seconds_sum": 0.0, "editkit_edit_latency_seconds_count": 0,
            "editkit_generate_requests_total": 0,
            "editkit_generation_latency_seconds_sum": 0.0, "editkit_generation_latency_seconds_count": 0,
            "editkit_queue_depth": 0, "editkit_generations_in_flight": 0,
        }

    def add(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.values[name] += value

    @contextmanager
    def gauge(self, name: str):
        self.add(name)
        try:
            yield
        finally:
            self.add(name, -1)

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self.values[f"{name}_sum"] += seconds
            self.values[f"{name}_count"] += 1

    HELP = {
        "editkit_edits_applied_total": ("counter", "Edits applied and journaled."),
        "editkit_edits_rolled_back_total": ("counter", "Edits rolled back."),
        "editkit_edit_latency_seconds": ("summary", "Seconds per edit request, queueing included."),
        "editkit_generate_requests_total": ("counter", "Generation requests served."),
        "editkit_generation_latency_seconds": ("summary", "Seconds per generation request."),
        "editkit_queue_depth": ("gauge", "Edit and rollback requests waiting or running."),
        "editkit_generations_in_flight": ("gauge", "Generation requests running."),
    }

    def render(self) -> str:
        with self._lock:
            values = dict(self.values)
        lines = []
        for name, (kind, text) in self.HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "summary":
                lines += [f"{name}_sum {values[name + '_sum']}", f"{name}_count {int(values[name + '_count'])}"]
            else:
                lines.append(f"{name} {values[name]:g}")
        return "\n".join(lines) + "\n"


# ---- the app ------------------------------------------------------------------------------
def _safe(text: str) -> str:
    """`text` as UTF-8 can carry it (a lone surrogate from the request becomes \\udXXX)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(status: int, reason: str, fields: list[dict] | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": {"status": status, "reason": _safe(reason), **extra}}
    if fields:
        body["error"]["fields"] = [{k: _safe(str(v)) for k, v in f.items()} for f in fields]
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS = [(EditVetoed, 409), (UnknownComponent, 404), (InvalidRequest, 422), (WorkspaceError, 409),
           (EditkitError, 400)]


class BodyLimit:
    """ASGI middleware: read the request body before the app does and refuse it (413) when it
    is over the limit, whether declared (content-length) or streamed (chunked)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error(413, f"request body over {self.limit} bytes")
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
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


def model_label(model: str) -> str:
    """How the service names its model: a local directory by its name, not its server path."""
    return Path(model).name if Path(model).is_absolute() else model


def create_app(session: Session, config: ServiceConfig | None = None) -> FastAPI:
    config = config or ServiceConfig()
    session.max_prompt_chars = config.max_prompt_chars  # one limit for the service and its session
    lock, metrics = RWLock(), Metrics()
    journal_path = session.workspace / "journal.sqlite"
    app = FastAPI(title="editkit", version="1", description="Lifelong model editing service")
    app.state.session, app.state.metrics, app.state.lock, app.state.config = session, metrics, lock, config
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    model = model_label(session.settings["model"])
    redact = _redactor({"<workspace>": session.workspace, "<data>": config.data_dir,
                        "<model>": session.settings["model"]})

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return _error(exc.status, redact(exc.reason), exc.fields)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_, exc: Unauthorized):
        return _error(401, str(exc))

    @app.exception_handler(EditkitError)
    async def _editkit_error(_, exc: EditkitError):
        status = next(code for cls, code in _STATUS if isinstance(exc, cls))
        fields = [{"field": exc.field, "reason": exc.reason}] if isinstance(exc, TextError) else None
        return _error(status, redact(str(exc)), fields)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        fields = [{"field": ".".join(str(p) for p in e["loc"] if p != "body"),
                   "reason": e["msg"].removeprefix("Value error, ")} for e in exc.errors()]
        return _error(422, "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        request_id = uuid.uuid4().hex
        log.error("request %s (%s %s) failed", request_id, request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error; the server log has the details under request id {request_id}",
                      request_id=request_id)

    Edits, Generate, Completion = capped_bodies(config)

    def generate(prompts: list[str], **kwargs) -> list[str]:
        started = time.perf_counter()
        with metrics.gauge("editkit_generations_in_flight"), lock.read():
            out = session.generate(prompts, **kwargs)
        metrics.add("editkit_generate_requests_total")
        metrics.observe("editkit_generation_latency_seconds", time.perf_counter() - started)
        return out

    def read_journal() -> Journal:
        return Journal(journal_path, readonly=True)

    def data_file(name: str) -> Path:
        """The suite file `name` inside the data directory, or 422."""
        if not config.data_dir:
            raise ApiError(422, "data: this server has no data directory (start it with --data-dir)")
        root = Path(config.data_dir).resolve()
        try:
            path = (root / name).resolve()
            inside = "\0" not in name and root in path.parents and path.is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            inside = False
        if not inside:
            raise ApiError(422, "data: not a file inside the server's data directory",
                           [{"field": "data", "reason": "outside the data directory or missing"}])
        return path

    # Handlers are plain `def`: FastAPI runs them in its thread pool, so a long edit
    # holds one worker thread, never the event loop that answers /health.
    @app.get("/health", dependencies=[Depends(reads_state)])
    def health() -> dict:
        journal = read_journal()
        try:
            active = journal.count("applied")
        finally:
            journal.close()
        return {"status": "ok", "model": model, "method": session.method,
                "active_edits": active, "queue_depth": int(metrics.values["editkit_queue_depth"])}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(reads_state)])
    def prometheus() -> str:
        return metrics.render()

    @app.post("/v1/edits", dependencies=[Depends(changes_state)])
    def post_edits(body: Edits) -> dict:
        for i, e in enumerate(body.edits):
            check_texts(((f"edits.{i}.{field}", text) for field, text in e.texts()), config.max_prompt_chars)
        started = time.perf_counter()
        with metrics.gauge("editkit_queue_depth"), lock.write():
            records = session.edit(body.edits)
        metrics.add("editkit_edits_applied_total", len(records))
        metrics.observe("editkit_edit_latency_seconds", time.perf_counter() - started)
        return {"edits": [{"id": r.id, "status": r.status, **r.metrics,
                           "seconds": r.stats.get("seconds")} for r in records]}

    @app.get("/v1/edits", dependencies=[Depends(reads_state)])
    def list_edits(offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                   status: Literal["applied", "rolled_back"] | None = None) -> dict:
        journal = read_journal()
        try:
            total = journal.count(status)
            records = journal.records(status=status, offset=offset, limit=limit)
        finally:
            journal.close()
        return {"total": total, "offset": offset, "limit": limit, "edits": [r.to_dict() for r in records]}

    @app.delete("/v1/edits/{edit_id}", dependencies=[Depends(changes_state)])
    def rollback(edit_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> dict:
        journal = read_journal()
        try:
            known = journal.record(edit_id) is not None
        finally:
            journal.close()
        if not known:
            raise ApiError(404, f"no edit with id {edit_id}")
        with metrics.gauge("editkit_queue_depth"), lock.write():
            record = session.rollback(edit_id)
        metrics.add("editkit_edits_rolled_back_total")
        return record.to_dict()

    @app.post("/v1/generate")
    def post_generate(body: Annotated[Generate, Depends(changes_state_when(Generate, "conversation"))]) -> dict:
        check_texts(((f"prompts.{i}", p) for i, p in enumerate(body.prompts)), config.max_prompt_chars)
        texts = generate(body.prompts, max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                         top_p=body.top_p, seed=body.seed, conversation=body.conversation)
        return {"completions": texts}

    @app.delete("/v1/conversations/{conversation}", dependencies=[Depends(changes_state)])
    def clear_conversation(conversation: Annotated[str, PathParam(pattern=CONVERSATION)]) -> dict:
        with lock.read():  # runtime memory only: no edit state changes
            session.clear_conversation(conversation)
        return {"conversation": conversation, "cleared": True}

    @app.post("/v1/completions", dependencies=[Depends(reads_state)])
    def completions(body: Completion) -> dict:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(422, "prompt: give at least one prompt", [{"field": "prompt", "reason": "empty list"}])
        if len(prompts) > config.max_batch:
            raise ApiError(422, f"prompt: at most {config.max_batch} prompts", [{"field": "prompt", "reason": "too many"}])
        check_texts(((f"prompt.{i}", p) for i, p in enumerate(prompts)), config.max_prompt_chars)
        texts = generate(prompts, max_new_tokens=body.max_tokens, temperature=body.temperature,
                         top_p=body.top_p, seed=body.seed)
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        tok = session.loaded.tokenizer
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            finish = "length"
            for stop in stops:
                if stop and stop in text:
                    text, finish = text[: text.index(stop)], "stop"
            choices.append({"text": text, "index": i, "logprobs": None, "finish_reason": finish})
            prompt_tokens += len(tok(prompt).input_ids)
            completion_tokens += len(tok(text, add_special_tokens=False).input_ids)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @app.post("/v1/evaluate", dependencies=[Depends(reads_server_files)])
    def evaluate(body: EvaluateBody) -> dict:
        from editkit.evaluation.metrics import teacher_forced_accuracy

        path = data_file(body.data) if body.data is not None else None
        requests = session.host.suite(body.suite)().load(str(path) if path else None, limit=body.limit)
        with lock.read():
            items = []
            for req in requests:
                rel = teacher_forced_accuracy(session.loaded, [req.prompt], [req.target_new])[0]
                gen = teacher_forced_accuracy(session.loaded, req.rephrases, [req.target_new] * len(req.rephrases))
                probes = [p for p in req.locality if p.answer]
                loc = teacher_forced_accuracy(session.loaded, [p.prompt for p in probes], [p.answer for p in probes])
                items.append({"prompt": req.prompt, "reliability": rel,
                              "generalization": sum(gen) / len(gen) if gen else None,
                              "locality_accuracy": sum(loc) / len(loc) if loc else None})

        def mean(key):
            values = [i[key] for i in items if i[key] is not None]
            return sum(values) / len(values) if values else None

        return {"suite": body.suite, "definition": "teacher-forced token accuracy on the current model",
                "count": len(items), "reliability": mean("reliability"),
                "generalization": mean("generalization"), "locality_accuracy": mean("locality_accuracy"),
                "items": items}

    return app


def _redactor(directories: dict[str, Any]):
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(session_factory, host: str = "127.0.0.1", port: int = 8000, config: ServiceConfig | None = None,
          log_level: str = "info") -> None:
    """Check the bind address, open the session, and run uvicorn until interrupted."""
    import uvicorn

    config = config or ServiceConfig()
    if not is_loopback(host) and not config.token:
        raise InvalidRequest(f"refusing to bind {host} (not a loopback address) without a token; "
                             "pass --token or set EDITKIT_TOKEN")
    session = session_factory()
    try:
        uvicorn.run(create_app(session, config), host=host, port=port, log_level=log_level)
    finally:
        session.close()
