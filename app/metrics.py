"""Prometheus metrics of the API (a registry per app, nothing at module level).

`serve --workers N` runs N processes behind one socket, and a scrape reaches one of them. So that
every scrape covers all of them, `serve` puts prometheus_client in multiprocess mode
(`multiprocess_directory`): each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR and
/metrics renders the sum of every worker's files. The mode is chosen when prometheus_client is
first imported, so a process that imported it before the directory was set (`serve --workers 1`,
serving in place, or the in-process tests) keeps its values in memory and renders them itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from payment_service import MULTIPROCESS_DIRECTORY_VARIABLE

logger = logging.getLogger(__name__)

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
        self.errors = Counter(
            "payment_api_errors_total",
            "Problem answers (4xx and 5xx), by code: DATABASE_UNAVAILABLE, VALIDATION_ERROR, ...",
            ["code"],
            registry=self.registry,
        )
        # At 0 from the start: an alert's increase() cannot see a series' first sample.
        self.errors.labels("DATABASE_UNAVAILABLE")
        # The series of each metric by their label values, for the request path: `labels()`
        # checks the values and looks the series up under a lock on every call, and the series
        # it answers is the same object for the life of the metric (which keeps every series it
        # has made, so remembering them here keeps nothing more).
        self.requests_of = functools.cache(self.requests.labels)
        self.latency_of = functools.cache(self.latency.labels)
        self.payments_created_of = functools.cache(self.payments_created.labels)
        self.replays_of = functools.cache(self.replays.labels)
        self.conflicts_of = functools.cache(self.conflicts.labels)
        self.errors_of = functools.cache(self.errors.labels)
        # What /metrics renders: this process's registry, or every worker's files.
        self._exposed = self.registry
        if multiprocess_values():
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed)  # type: ignore[no-untyped-call]

    def render(self) -> bytes:
        return generate_latest(self._exposed)


def multiprocess_values() -> bool:
    """Whether this process's metric values live in PROMETHEUS_MULTIPROC_DIR's files."""
    return values.ValueClass is not values.MutexValue


@contextlib.contextmanager
def multiprocess_directory() -> Iterator[Path]:
    """PROMETHEUS_MULTIPROC_DIR for the workers `serve` starts, set in this process's environment
    (which they inherit) before any of them imports prometheus_client.

    A configured directory is kept, but its metric files are removed first: counters from an
    earlier run must not add up with this one's. Otherwise a fresh temporary directory is made,
    and removed on the way out.
    """
    configured = os.environ.get(MULTIPROCESS_DIRECTORY_VARIABLE)
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # only prometheus_client's files
            stale.unlink()
        logger.info("metrics directory wiped", extra={"path": str(path)})
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="payment-service-metrics-"))
    os.environ[MULTIPROCESS_DIRECTORY_VARIABLE] = str(path)
    try:
        yield path
    finally:
        del os.environ[MULTIPROCESS_DIRECTORY_VARIABLE]
        shutil.rmtree(path, ignore_errors=True)
