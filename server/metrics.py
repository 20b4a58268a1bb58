"""Prometheus metrics: one set per process, summed over ``--workers`` through prometheus_client's multiprocess mode.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``g2g-serve --workers N`` does it), every worker writes its values to files
in that directory and a scrape of any worker sums them, so counters never go down between scrapes whichever
worker answers. Process metrics (``process_resident_memory_bytes`` …) are then those of the answering worker.
"""
from __future__ import annotations

import os
from typing import Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest, multiprocess)

from .errors import TrackedSend

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        if multiprocess_dir() is None:
            ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self.request_latency = Histogram("g2g_request_latency_seconds", "POST /classify latency, queue + inference + "
                                         "decoding", buckets=LATENCY_BUCKETS, registry=r)
        self.decode_latency = Histogram("g2g_decode_latency_seconds", "decoding one request's images (thread pool)",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.inference_latency = Histogram("g2g_inference_latency_seconds", "one batched forward pass",
                                           buckets=LATENCY_BUCKETS, registry=r)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.batch_size = Histogram("g2g_batch_size", "images per forward pass", buckets=buckets, registry=r)
        self.queue_depth = Gauge("g2g_queue_depth", "images admitted and not yet answered", registry=r,
                                 multiprocess_mode="livesum")
        self.requests = Counter("g2g_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.errors = Counter("g2g_errors", "HTTP responses with status >= 400", ["path", "status"], registry=r)
        self.rejected = Counter("g2g_rejected", "requests refused at admission (503: queue full or too slow)",
                                registry=r)
        self.before_scrape: list[Callable[[], None]] = []  # flush counts kept aside (server/admission.py)
        self.model_info = Gauge("g2g_model_info", "the served model (value 1)",
                                ["name", "version", "backend", "device", "variant", "formats"], registry=r,
                                multiprocess_mode="max")

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets: this process's registry, or the sum over all workers in multiprocess mode."""
        for flush in self.before_scrape:
            flush()
        if multiprocess_dir() is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        ProcessCollector(registry=registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class RequestCounter:
    """ASGI middleware counting responses by path and status (a plain ASGI wrapper: no per-request task)."""

    def __init__(self, app, metrics: Metrics, known_paths: set[str]):
        self.app, self.metrics, self.known_paths = app, metrics, known_paths
        self._children: dict[tuple[str, int], tuple] = {}  # (path, status) -> its counters (``labels`` locks, copies)

    def _count(self, path: str, status: int) -> None:
        children = self._children.get((path, status))
        if children is None:
            m, label = self.metrics, str(status)
            children = self._children[(path, status)] = (
                (m.requests.labels(path, label),) + ((m.errors.labels(path, label),) if status >= 400 else ()))
        for child in children:
            child.inc()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tracked = TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        finally:
            status = tracked.status
            route = getattr(scope.get("route"), "path", None)  # the matched template: /v2/models/{name}/infer
            path = route or (scope["path"] if scope["path"] in self.known_paths else "other")
            self._count(path, status)
