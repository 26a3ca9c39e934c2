"""Shared batches for concurrent generation requests: a micro-batcher.

Requests that arrive while a batch is being gathered are decoded together as one padded
batch, up to `max_rows` prompts. Under load a batch waits, up to PATIENCE windows, for as
many prompts as the batch that just finished had plus those already waiting: clients that
got their answers together send their next requests a few milliseconds apart, and a batch
that leaves without them splits the clients into two halves that then take turns (measured:
half the throughput at concurrency 8). A request that finds no batch just finished and none
waiting waits one window for company, longer while newcomers keep coming within a window
of each other (a burst of clients joins one batch), never more than PATIENCE windows. Each request keeps
its own length, sampling, random stream (a seeded request gets the same text alone or
batched) and stop strings (editkit.generation.decode). Requests with different conversations
go to different batches: a conversation's runtime memory (reweave) is selected for a whole
forward pass.

Why not continuous batching (requests joining and leaving a running batch at decoding
steps, as vLLM, TGI and transformers' continuous-batching manager do): editkit's components
keep per-row state by batch index across the cached steps of one generation (WISE decides
each row's route on its prompt and keeps it, NMC carries each row's running query, reweave
reads the call's conversation), and transformers' manager packs sequences into one row of a
paged cache, which none of those hooks can read. A row joining mid-batch would need its own
prefill with those hooks, at a different cache length, so a batch here starts and ends whole.

Edits: a batch decodes under the service's read lock and an edit takes the write lock, which
admits requests in arrival order: the batch in flight finishes on the state it started with,
the edit waits for it (that wait is a metric), and batches gathered after the edit see it."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from editkit.generation import Decoded, Row

_STOP = object()
PATIENCE = 5  # under load a batch waits up to this many windows for the last batch's size
_streams = itertools.count(1)


@dataclass
class Job:
    """One generation request: its rows (one random stream), where its tokens go, its result."""

    rows: list[Row]
    conversation: str | None = None
    on_token: Callable[[int, int, str], None] | None = None  # (row of this job, token id, text so far)
    enqueued: float = field(default_factory=time.perf_counter)
    result: list[Decoded] | None = None
    error: BaseException | None = None
    cancelled: bool = False  # the client went away: its rows stop at the next token
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> list[Decoded]:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Scheduler:
    def __init__(self, session, lock, telemetry, max_rows: int = 32, window: float = 0.005):
        self.session, self.lock, self.telemetry = session, lock, telemetry
        self.max_rows, self.window = max_rows, window
        self._queue: queue.Queue = queue.Queue()
        self._carry: deque[Job] = deque()
        self._returning = 0  # prompts of the batch that just finished plus those queued by then
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def submit(self, rows: list[Row], conversation: str | None = None,
               on_token: Callable[[int, int, str], None] | None = None) -> Job:
        """Queue a request (checked first: a bad one fails here, not its batch)."""
        self.session.check_rows(rows, conversation)
        stream = next(_streams)
        job = Job([Row(**{**r.__dict__, "stream": stream}) for r in rows], conversation, on_token)
        self._ensure_running()
        self.telemetry.waiting.inc()
        self._queue.put(job)
        return job

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=60)
            self._thread = None

    def _ensure_running(self) -> None:
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="editkit-batcher", daemon=True)
                self._thread.start()

    # ---- the loop ----------------------------------------------------------------------
    def _next(self, timeout: float | None):
        if self._carry:
            return self._carry.popleft()
        return self._queue.get(timeout=timeout) if timeout is not None else self._queue.get()

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """`first` and what joins it (see the module doc), up to max_rows prompts, one
        conversation; whether the scheduler was asked to stop meanwhile."""
        jobs, rows = [first], len(first.rows)
        started = time.perf_counter()
        waiting = sum(len(j.rows) for j in self._carry) + self._queue.qsize()  # a lower bound: jobs, not rows
        expected = min(self.max_rows, max(rows + waiting, self._returning))
        self._returning = 0
        last = started  # when the latest request joined
        while rows < self.max_rows:
            if rows >= expected:
                remaining = 0.0  # take what is already waiting, then go
            elif expected > 1:
                remaining = started + PATIENCE * self.window - time.perf_counter()
            else:  # no batch to wait for: go once a window passes without a newcomer (a burst joins whole)
                remaining = min(started + PATIENCE * self.window, last + self.window) - time.perf_counter()
            if remaining <= 0 and not self._carry and self._queue.empty():
                break
            try:
                job = self._next(max(remaining, 0.0))
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            if job.conversation != first.conversation or rows + len(job.rows) > self.max_rows:
                self._carry.append(job)  # the next batch starts with it
                break
            jobs.append(job)
            rows += len(job.rows)
            last = time.perf_counter()
        return jobs, False

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._next(None)
            if first is _STOP:
                break
            jobs, stopping = self._gather(first)
            self._run(jobs)
        while self._carry:  # asked to stop: finish what was accepted
            self._run([self._carry.popleft()])

    def _run(self, jobs: list[Job]) -> None:
        owners = [(job, j) for job in jobs for j in range(len(job.rows))]
        rows = [row for job in jobs for row in job.rows]
        started = time.perf_counter()
        for job in jobs:
            self.telemetry.waiting.dec()
            self.telemetry.batch_wait.observe(started - job.enqueued)
        self.telemetry.batch_rows.observe(len(rows))

        def on_token(i: int, token: int, text: str) -> None:
            job, j = owners[i]
            if job.on_token is not None:
                job.on_token(j, token, text)

        # Without a streaming client no row's text is needed per token (decoding it each step
        # measured 7% of a batch of 8).
        listen = on_token if any(job.on_token is not None for job in jobs) else None

        try:
            self.telemetry.in_flight.inc(len(rows))
            try:
                with self.lock.read():
                    out = self.session.decode(rows, jobs[0].conversation, on_token=listen,
                                              cancelled=lambda i: owners[i][0].cancelled)
            finally:
                self.telemetry.in_flight.dec(len(rows))
        except BaseException as exc:  # the batch failed: every request in it hears why
            for job in jobs:
                job.error = exc
                job.done.set()
            return
        self.telemetry.tokens.inc(sum(len(d.ids) for d in out))
        # The next batch waits for these clients and for those that queued meanwhile.
        self._returning = len(rows) + self._queue.qsize() + sum(len(j.rows) for j in self._carry)
        i = 0
        for job in jobs:
            job.result = out[i: i + len(job.rows)]
            i += len(job.rows)
            job.done.set()
