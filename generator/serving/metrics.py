"""The service's Prometheus metrics (``prometheus-client``), in a registry of their own per app.

- ``semid_requests_total{endpoint, status}``: requests answered, by route template and HTTP status;
- ``semid_request_seconds{endpoint}``: latency histogram, from the first byte read to the last byte sent;
- ``semid_batch_histories``: histories per decoded batch; ``semid_batch_requests``: requests per batch;
  ``semid_batch_groups``: ``Recommender.recommend`` calls per batch (histories that rank alike share one);
  ``semid_decode_seconds``: a batch's decoding time;
- ``semid_reloads_total{outcome}``: reloads done or refused; ``semid_model_info{version}``: the version served.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ROUTES = ("/recommend", "/recommend/batch", "/healthz", "/readyz", "/metrics", "/admin/reload", "/docs",
          "/openapi.json")


def endpoint_of(path: str) -> str:
    """The route template of ``path`` (a bounded set of label values): ``/items/{id}`` only for a path that route
    answers (one segment after ``/items/``; ``/items/`` and ``/items/1/x`` are 404s of no route, "other")."""
    if path in ROUTES:
        return path
    head, _, rest = path.rpartition("/")
    return "/items/{id}" if head == "/items" and rest else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("semid_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("semid_request_seconds", "Request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_histories = Histogram("semid_batch_histories", "Histories per decoded batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("semid_batch_requests", "Requests per decoded batch", buckets=BATCH_BUCKETS, registry=r)
        self.batch_groups = Histogram("semid_batch_groups", "Decoder calls (groups) per decoded batch", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.decode = Histogram("semid_decode_seconds", "Decoding time of a batch", buckets=LATENCY_BUCKETS, registry=r)
        self.reloads = Counter("semid_reloads", "Reloads by outcome", ["outcome"], registry=r)
        self.model = Info("semid_model", "The version served", registry=r)

    def on_batch(self, histories: int, requests: int, groups: int, seconds: float) -> None:
        self.batch_histories.observe(histories)
        self.batch_requests.observe(requests)
        self.batch_groups.observe(groups)
        self.decode.observe(seconds)

    def text(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware that counts and times every HTTP request by route template and status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status, started = time.perf_counter(), [500], [False]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:  # the server stopping (its grace period over) cancels the requests still open:
            if not started[0]:  # a JSON 503 for each, not a plain 500 and a logged traceback
                status[0] = 503
                body = json.dumps({"error": {"field": None, "value": None, "allowed": None, "message": "the service "
                                             "is shutting down: send the request again (to another instance)"}})
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body.encode()})
        finally:
            endpoint = endpoint_of(scope["path"])
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
