"""The HTTP service: serve the edited model and take edits while serving (FastAPI), one router
per resource (editkit.service.routes) with the session, lock, scheduler and metrics injected
through `Depends` (editkit.service.state).

Concurrency: concurrent generation requests share batches (editkit.service.scheduler); a
batch decodes under a read lock and edits and rollbacks take the write lock, so a generation
sees the state before or after an edit, never half of one. Durability comes from the
Session: an edit is journaled (committed) before the response acknowledges it.

Read replicas: a session that follows its workspace (Session.open(follow=True), `editkit serve
--follow WS`) serves the heads its writer commits (editkit.service.follower) and answers edits
and rollbacks 409 with the writer's address.

Access: every route declares whether it changes state (editkit.access); those that do need
the bearer token when one is set. Errors: every error is JSON with a reason, no reason names
a server directory, and an unexpected error is logged with a request id (editkit.service.errors)."""

from __future__ import annotations

import ipaddress
from contextlib import asynccontextmanager

from fastapi import FastAPI

from editkit.errors import InvalidRequest
from editkit.rwlock import RWLock
from editkit.session import Session

from .bodies import Bodies
from .config import ServiceConfig
from .errors import BodyLimit, install_handlers, redactor
from .follower import Follower
from .routes import admin, edits, generation, openai
from .scheduler import Scheduler
from .state import ServiceState
from .telemetry import RouteMetrics, Telemetry


def create_app(session: Session, config: ServiceConfig | None = None) -> FastAPI:
    config = config or ServiceConfig()
    session.max_prompt_chars = config.max_prompt_chars  # one limit for the service and its session
    lock, telemetry = RWLock(), Telemetry()
    scheduler = Scheduler(session, lock, telemetry, max_rows=config.batch_rows, window=config.batch_window_ms / 1000)
    bodies = Bodies(config)

    follower = Follower(session, lock, telemetry, config.poll_interval) if session.following else None

    @asynccontextmanager
    async def lifespan(_app):
        if follower:
            follower.start()
        yield
        if follower:
            follower.stop()
        scheduler.close()

    app = FastAPI(title="editkit", version="1", description="Lifelong model editing service", lifespan=lifespan)
    app.state.service = ServiceState(session, config, lock, telemetry, scheduler, bodies, follower)
    app.state.session, app.state.lock, app.state.config = session, lock, config  # read by editkit.access
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(RouteMetrics, telemetry=telemetry)
    install_handlers(app, redactor({"<workspace>": session.workspace, "<data>": config.data_dir,
                                    "<model>": session.settings["model"]}))
    for module in (admin, edits, generation, openai):
        app.include_router(module.router(bodies))
    return app


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
