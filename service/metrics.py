"""Prometheus metrics of one service instance.

Each app has a registry of its own (several apps can live in one process, as
in the tests). Labels are route templates, methods and statuses only: never
paths, environments or tokens, which would make the series unbounded.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_Series = list[Any]  # the requests, duration, bytes in and bytes out series of one label set
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
        self._series: dict[tuple[str, str, int], _Series] = {}

    def observe(
        self, method: str, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            series = self._series_for(method, route, status)
        series[0].inc()
        series[1].observe(seconds)
        if bytes_in:
            if series[2] is None:  # byte series appear once there are bytes, not at 0
                series[2] = self.bytes_in.labels(route)
            series[2].inc(bytes_in)
        if bytes_out:
            if series[3] is None:
                series[3] = self.bytes_out.labels(route)
            series[3].inc(bytes_out)

    def _series_for(self, method: str, route: str, status: int) -> _Series:
        """The children of one label set, looked up once: `labels()` costs more than `inc()`."""
        label = method if method in METHODS else "OTHER"
        series: _Series = [
            self.requests.labels(label, route, str(status)),
            self.duration.labels(label, route),
            None,
            None,
        ]
        if len(self._series) < 10_000:  # routes x methods x statuses: bounded, but be sure
            self._series[method, route, status] = series
        return series

    def render(self) -> bytes:
        return generate_latest(self.registry)
