"""Prometheus metrics of one service instance.

Each app has a registry of its own (several apps can live in one process, as
in the tests). Labels are route templates, methods and statuses only: never
paths, environments or tokens, which would make the series unbounded.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"})


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        ProcessCollector(registry=reg)
        self.requests = Counter(
            "rescat_http_requests",
            "HTTP requests served",
            ["method", "route", "status"],
            registry=reg,
        )
        self.duration = Histogram(
            "rescat_http_request_duration_seconds",
            "Time from request start to the end of the response",
            ["method", "route"],
            registry=reg,
        )
        self.in_flight = Gauge(
            "rescat_http_requests_in_flight", "Requests being served", registry=reg
        )
        self.bytes_in = Counter(
            "rescat_http_received_bytes", "Request body bytes received", ["route"], registry=reg
        )
        self.bytes_out = Counter(
            "rescat_http_sent_bytes", "Response body bytes sent", ["route"], registry=reg
        )
        self.dedup_hits = Counter(
            "rescat_dedup_hits",
            "Paths created by a proof of access instead of an upload",
            registry=reg,
        )
        self.dedup_bytes = Counter(
            "rescat_dedup_saved_bytes",
            "Content bytes that proofs of access saved uploading",
            registry=reg,
        )
        self.proof_failures = Counter(
            "rescat_proof_failures", "Proof-of-access answers refused", ["reason"], registry=reg
        )

    def observe(
        self, method: str, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        method = method if method in METHODS else "OTHER"
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)
        if bytes_in:
            self.bytes_in.labels(route).inc(bytes_in)
        if bytes_out:
            self.bytes_out.labels(route).inc(bytes_out)

    def render(self) -> bytes:
        return generate_latest(self.registry)
