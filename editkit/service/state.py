"""What every route reaches through FastAPI's dependency injection: the session, the lock
that orders edits and generations, the batch scheduler, the metrics, the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from editkit.rwlock import RWLock
from editkit.session import Session
from editkit.store import Journal

from .bodies import Bodies
from .config import ApiError, ServiceConfig
from .scheduler import Scheduler
from .telemetry import Telemetry

if TYPE_CHECKING:
    from .follower import Follower


def model_label(model: str) -> str:
    """How the service names its model: a local directory by its name, not its server path."""
    return Path(model).name if Path(model).is_absolute() else model


@dataclass
class ServiceState:
    session: Session
    config: ServiceConfig
    lock: RWLock
    telemetry: Telemetry
    scheduler: Scheduler
    bodies: Bodies
    follower: "Follower | None" = None

    def check_writer(self) -> None:
        """409 on a read replica: edits and rollbacks go to the writer."""
        if self.session.following:
            where = f" at {self.config.writer}" if self.config.writer else ""
            raise ApiError(409, f"this server is a read replica; send edits and rollbacks to the writer{where}")

    @property
    def model(self) -> str:
        return model_label(self.session.settings["model"])

    def read_journal(self) -> Journal:
        """The journal, read-only: it reads while an edit runs."""
        return Journal(self.session.workspace / "journal.sqlite", readonly=True)

    def data_file(self, name: str) -> Path:
        """The suite file `name` inside the data directory, or 422."""
        if not self.config.data_dir:
            raise ApiError(422, "data: this server has no data directory (start it with --data-dir)")
        root = Path(self.config.data_dir).resolve()
        try:
            path = (root / name).resolve()
            inside = "\0" not in name and root in path.parents and path.is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            inside = False
        if not inside:
            raise ApiError(422, "data: not a file inside the server's data directory",
                           [{"field": "data", "reason": "outside the data directory or missing"}])
        return path


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


State = Annotated[ServiceState, Depends(get_state)]
