"""Prometheus metrics of one relay process, served on RELAY_METRICS_PORT (0 turns them off)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from payment_service.deliveries import Backlog
from payment_service.vocabulary import ENDPOINT_STATES

logger = logging.getLogger(__name__)

# How a gauge of the database's backlog combines across processes: every relay sees the same.
_BACKLOG: Final = "livemax"

BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class RelayMetrics:
    """The relay's collectors, in a registry of their own.

    A relay is one process with its own /metrics (one scrape target per relay), so it does not use
    prometheus_client's multiprocess mode. Its gauges still say how they would combine across
    processes: the in-flight count adds up, the database's backlog is the same seen from any
    relay (the largest live one).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        deliveries = Counter(
            "relay_deliveries",
            "Delivery attempts by outcome: delivered, rescheduled, dead, released (shutdown).",
            ["outcome"],
            registry=r,
        )
        self.delivered = deliveries.labels("delivered")
        self.rescheduled = deliveries.labels("rescheduled")
        self.dead = deliveries.labels("dead")
        self.released = deliveries.labels("released")
        self.delivery_seconds = Histogram(
            "relay_delivery_duration_seconds",
            "Time of one delivery attempt, quick retries included.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.event_lag_seconds = Histogram(
            "relay_event_delivery_lag_seconds",
            "From the event's creation to its successful delivery.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.claimed = Counter(
            "relay_claimed_deliveries", "Deliveries leased by this relay.", registry=r
        )
        self.lost_leases = Counter(
            "relay_lost_leases",
            "Attempts whose result was not written: the lease ran out and another relay took over.",
            registry=r,
        )
        self.loop_restarts = Counter(
            "relay_loop_restarts", "Restarts of a relay loop after an error.", ["loop"], registry=r
        )
        self.endpoint_state_changes = Counter(
            "relay_endpoint_state_changes",
            "Endpoint health changes this relay made, by endpoint and new state: the breaker's "
            "open, half_open, closed, or the endpoint's disabled.",
            ["endpoint", "to"],
            registry=r,
        )
        self.unservable_endpoints = Counter(
            "relay_unservable_endpoints",
            "Endpoints this relay DISABLED because it cannot deliver to them (a URL no request "
            "can be made to), by endpoint.",
            ["endpoint"],
            registry=r,
        )
        self.in_flight = Gauge(
            "relay_in_flight_deliveries",
            "Deliveries this relay has in flight.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.pending = Gauge(
            "outbox_pending_deliveries",
            "Deliveries not yet delivered, every endpoint.",
            multiprocess_mode=_BACKLOG,
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest undelivered delivery, every endpoint (0 when none).",
            multiprocess_mode=_BACKLOG,
            registry=r,
        )
        self.dead_deliveries = Gauge(
            "outbox_dead_deliveries",
            "Deliveries given up on (DEAD), every endpoint.",
            multiprocess_mode=_BACKLOG,
            registry=r,
        )
        # Per endpoint (label `endpoint`: its name). The totals above stay for dashboards and
        # alerts written before subscriptions. A metric's name says what it counts: deliveries
        # (an event to one endpoint), not events; docs/operations.md lists the names renamed.
        self.endpoint_deliveries = Counter(
            "relay_endpoint_deliveries",
            "Delivery attempts by endpoint and outcome: delivered, rescheduled, dead, released.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.endpoint_pending = Gauge(
            "outbox_endpoint_pending_deliveries",
            "Deliveries not yet delivered, by endpoint.",
            ["endpoint"],
            multiprocess_mode=_BACKLOG,
            registry=r,
        )
        self.endpoint_oldest_pending_age = Gauge(
            "outbox_endpoint_oldest_pending_age_seconds",
            "Age of the endpoint's oldest undelivered delivery (0 when none).",
            ["endpoint"],
            multiprocess_mode=_BACKLOG,
            registry=r,
        )
        self.endpoint_dead = Gauge(
            "outbox_endpoint_dead_deliveries",
            "Deliveries given up on (DEAD), by endpoint.",
            ["endpoint"],
            multiprocess_mode=_BACKLOG,
            registry=r,
        )
        self.endpoint_breaker = Gauge(
            "outbox_endpoint_breaker_state",
            "The endpoint's breaker: 0 closed, 1 half_open (one probe may go), 2 open.",
            ["endpoint"],
            multiprocess_mode=_BACKLOG,
            registry=r,
        )
        self.endpoint_state = Gauge(
            "outbox_endpoint_state",
            "1 for the endpoint's state (ACTIVE, PAUSED, DISABLED), 0 for the others.",
            ["endpoint", "state"],
            multiprocess_mode=_BACKLOG,
            registry=r,
        )
        # The gateway worker (outbox_relay.gateway_worker; only with GATEWAY=stripe).
        self.gateway_review = Gauge(
            "gateway_review_payments",
            "Charges and refunds whose outcome at the gateway stayed unknown after "
            "GATEWAY_MAX_CHECKS checks: flagged for an operator (payment-service gateway review).",
            multiprocess_mode=_BACKLOG,
            registry=r,
        )
        self.gateway_reconciliation_differences = Gauge(
            "gateway_reconciliation_differences",
            "Differences between our charges and refunds and the gateway's found by the last "
            "scheduled reconciliation (payment-service reconcile names them).",
            multiprocess_mode=_BACKLOG,
            registry=r,
        )
        self.gateway_checks = Counter(
            "gateway_checks",
            "Operations the gateway worker took up, by kind (charge, refund) and what it learnt: "
            "decided, processing, unknown, lease_lost.",
            ["kind", "result"],
            registry=r,
        )
        self._endpoints_shown: set[str] = set()

    def set_backlog(self, rows: list[Backlog]) -> None:
        """The per-endpoint gauges, and the totals, from one row per endpoint; an endpoint no
        longer listed (removed) loses its series."""
        names = {row.name for row in rows}
        for gone in self._endpoints_shown - names:
            for gauge in (
                self.endpoint_pending,
                self.endpoint_oldest_pending_age,
                self.endpoint_dead,
                self.endpoint_breaker,
            ):
                gauge.remove(gone)
            for state in ENDPOINT_STATES:
                self.endpoint_state.remove(gone, state)
        self._endpoints_shown = names
        for row in rows:
            self.endpoint_pending.labels(row.name).set(row.pending)
            self.endpoint_oldest_pending_age.labels(row.name).set(row.oldest_age_seconds or 0)
            self.endpoint_dead.labels(row.name).set(row.dead)
            self.endpoint_breaker.labels(row.name).set(BREAKER_VALUES[row.breaker])
            for state in ENDPOINT_STATES:
                self.endpoint_state.labels(row.name, state).set(int(row.state == state))
        self.pending.set(sum(row.pending for row in rows))
        self.oldest_pending_age.set(max((row.oldest_age_seconds or 0 for row in rows), default=0))
        self.dead_deliveries.set(sum(row.dead for row in rows))

    def serve(self, host: str, port: int) -> Any | None:
        """Serve /metrics in a daemon thread; None (and a warning) when the port is taken."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            logger.warning(
                "metrics endpoint not started",
                extra={"host": host, "port": port, "error": str(error)},
            )
            return None
        logger.info("metrics endpoint listening", extra={"host": host, "port": port})
        return server

    @staticmethod
    def shutdown(server: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()
