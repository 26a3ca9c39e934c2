"""The service's Prometheus metrics (prometheus_client, one registry per app): latency
histograms of edits and generations, how long edits wait for generations in flight and
generation requests for their batch, batch sizes, tokens, requests per route and status,
queue gauges, and the process's own figures."""

from __future__ import annotations

from contextlib import contextmanager

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Telemetry:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter("editkit_http_requests", "HTTP requests by method, route and status.",
                                ["method", "route", "status"], registry=r)
        self.edits_applied = Counter("editkit_edits_applied", "Edits applied and journaled.", registry=r)
        self.edits_rolled_back = Counter("editkit_edits_rolled_back", "Edits rolled back.", registry=r)
        self.edit_latency = Histogram("editkit_edit_latency_seconds", "Seconds per edit or rollback request, "
                                      "waiting included.", buckets=SECONDS, registry=r)
        self.edit_wait = Histogram("editkit_edit_wait_seconds", "Seconds an edit or rollback waited for the "
                                   "generations in flight to finish.", buckets=SECONDS, registry=r)
        self.generation_latency = Histogram("editkit_generation_latency_seconds", "Seconds per generation request.",
                                            buckets=SECONDS, registry=r)
        self.batch_wait = Histogram("editkit_batch_wait_seconds", "Seconds a generation request waited for its "
                                    "batch to start.", buckets=SECONDS, registry=r)
        self.batch_rows = Histogram("editkit_batch_rows", "Prompts decoded together per batch.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.tokens = Counter("editkit_generated_tokens", "Tokens generated (tokens per second: its rate).",
                              registry=r)
        self.generations = Counter("editkit_generate_requests", "Generation requests served.", registry=r)
        self.queue_depth = Gauge("editkit_queue_depth", "Edit and rollback requests waiting or running.", registry=r)
        self.waiting = Gauge("editkit_generation_queue_depth", "Generation requests waiting for a batch.", registry=r)
        self.in_flight = Gauge("editkit_generations_in_flight", "Prompts being decoded.", registry=r)
        self.head = Gauge("editkit_head_state", "Journal id of the state served (a replica's follows its writer).",
                          registry=r)
        self.switches = Counter("editkit_head_switches", "Times a replica switched to a newer head.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0

    @contextmanager
    def edit(self, lock):
        """Time an edit or rollback under the write lock: its whole latency and its wait."""
        import time

        self.queue_depth.inc()
        started = time.perf_counter()
        try:
            with lock.write():
                self.edit_wait.observe(time.perf_counter() - started)
                yield
        finally:
            self.queue_depth.dec()
            self.edit_latency.observe(time.perf_counter() - started)


class RouteMetrics:
    """ASGI middleware counting requests by method, route template and status."""

    def __init__(self, app, telemetry: Telemetry):
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "(unmatched)"
            self.telemetry.requests.labels(scope["method"], path, str(status["code"])).inc()
