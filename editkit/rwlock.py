"""A fair readers-writer lock: many generations at once, one edit at a time, and requests
admitted in arrival order, so neither kind starves the other. (Writer preference, the lock's
first form, let two clients sending edits back to back keep every generation waiting: the
concurrency soak saw 4 generations answered against 107 edits in 20 s.)"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class RWLock:
    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._next_ticket = 0  # handed to each request as it arrives
        self._serving = 0  # the ticket admitted next: readers in a row enter together

    def _take_ticket(self) -> int:
        ticket = self._next_ticket
        self._next_ticket += 1
        return ticket

    @contextmanager
    def read(self):
        with self._cond:
            ticket = self._take_ticket()
            while ticket != self._serving or self._writer:
                self._cond.wait()
            self._readers += 1
            self._serving += 1
            self._cond.notify_all()  # the next in line may be a reader too
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            ticket = self._take_ticket()
            while ticket != self._serving or self._writer or self._readers:
                self._cond.wait()
            self._writer = True
            self._serving += 1
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
