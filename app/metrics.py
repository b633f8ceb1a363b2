"""Prometheus metrics of one API process (a registry per app, nothing at module level)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "payment_api_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "payment_api_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self.payments_created = Counter(
            "payment_payments_created_total",
            "Payments created, by initial status.",
            ["status"],
            registry=self.registry,
        )
        self.refunds_created = Counter(
            "payment_refunds_created_total", "Refunds created.", registry=self.registry
        )
        self.replays = Counter(
            "payment_idempotent_replays_total",
            "Answers replayed from an idempotency key, by route template.",
            ["route"],
            registry=self.registry,
        )
        self.conflicts = Counter(
            "payment_conflicts_total",
            "409 answers, by code.",
            ["code"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
