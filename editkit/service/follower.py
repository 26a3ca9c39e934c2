"""A read replica's loop: poll the workspace journal for a head the writer committed, read
its chunks (only those that changed) while generations go on, then switch to it under the
write lock, so a request sees one head, never a mixture. A failed poll (a chunk the writer
dropped while it was read, say) is tried again at the next interval. A replica lags its
writer by at most one interval plus the time to read the new chunks; /health says by how much."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("editkit.service")


class Follower:
    def __init__(self, session, lock, telemetry, interval: float):
        self.session, self.lock, self.telemetry, self.interval = session, lock, telemetry, interval
        self.last_poll = time.time()
        self.switched_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        telemetry.head.set(session.head_id)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="editkit-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def poll_once(self) -> bool:
        """Switch to the writer's head if it moved; whether it did."""
        polled = self.session.poll()
        self.last_poll = time.time()
        if polled is None:
            return False
        with self.lock.write():
            self.session.switch(polled)
        self.switched_at = time.time()
        self.telemetry.head.set(self.session.head_id)
        self.telemetry.switches.inc()
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll_once()
            except Exception:  # logged; the next interval tries again
                log.exception("following %s: poll failed", self.session.workspace)

    def describe(self) -> dict:
        return {"poll_interval": self.interval, "seconds_since_poll": round(time.time() - self.last_poll, 3),
                "switched_at": self.switched_at}
