"""Deliveries (table `deliveries`): what operators read about them, and its SQL.

The console's reads: each endpoint's backlog (pending, the oldest pending age, dead), an
endpoint's latest deliveries and those it keeps failing, and a payment's events with their
deliveries and attempts. Every statement reads through an index that keeps its cost to the rows
it shows, whatever the size of the retained history (the tests EXPLAIN them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from payment_service.sql import Statement

RECENT_WINDOW = 5000  # an endpoint's latest deliveries are looked for among this many, newest
ATTEMPTS_SHOWN = 20  # the latest attempts of a delivery a payment's story shows

# Per endpoint: pending deliveries, the oldest one's age, dead ones, its state and breaker. Read
# through the partial indexes on PENDING and DEAD rows, so the cost follows the backlog, not the
# retained history. The relay's gauges read it every few seconds; the console's overview too.
BACKLOG = Statement(
    """
    SELECT ep.name,
           pending.n AS pending,
           pending.oldest_age_seconds,
           dead.n AS dead,
           ep.state,
           CASE WHEN ep.breaker_open_until IS NULL THEN 'closed'
                WHEN ep.breaker_open_until > now() THEN 'open'
                ELSE 'half_open' END AS breaker
      FROM endpoints AS ep
     CROSS JOIN LATERAL (
            SELECT count(*) AS n,
                   extract(epoch FROM now() - min(d.created_at))::float8 AS oldest_age_seconds
              FROM deliveries AS d
             WHERE d.endpoint_id = ep.endpoint_id
               AND d.status = 'PENDING') AS pending
     CROSS JOIN LATERAL (
            SELECT count(*) AS n
              FROM deliveries AS d
             WHERE d.endpoint_id = ep.endpoint_id
               AND d.status = 'DEAD') AS dead
     ORDER BY ep.name
    """
)


@dataclass(frozen=True)
class Backlog:
    """One endpoint's backlog (BACKLOG)."""

    name: str
    pending: int
    oldest_age_seconds: float | None  # None: nothing pending
    dead: int
    state: str
    breaker: str


async def select_backlog(conn: asyncpg.Connection) -> list[Backlog]:
    """Every endpoint's backlog, by name."""
    rows = await conn.fetch(BACKLOG.sql, *BACKLOG.args())
    return [Backlog(**dict(row)) for row in rows]


# -- an endpoint's deliveries ---------------------------------------------------------------------
# What a line about one delivery shows: its event, where it stands, and its last attempt.
_LINE = """
    d.delivery_id,
    e.event_id::text,
    e.event_type,
    d.aggregate_id AS payment_id,
    d.status,
    d.attempts,
    d.last_status_code,
    d.last_error,
    d.last_attempt_at,
    d.next_attempt_at,
    d.delivered_at,
    (d.attempt_log -> -1)::text AS last_attempt
"""

# The endpoint's latest deliveries, newest first, among the newest :window deliveries of every
# endpoint: a bounded read of the primary key, whatever the table holds (an endpoint that got
# nothing lately shows nothing here; its row says when it last succeeded).
LATEST = Statement(
    f"""
    SELECT {_LINE}
      FROM (SELECT delivery_id
              FROM deliveries
             ORDER BY delivery_id DESC
             LIMIT :window) AS newest
      JOIN deliveries AS d ON d.delivery_id = newest.delivery_id
      JOIN outbox_events AS e ON e.id = d.event_id
     WHERE d.endpoint_id = :endpoint_id
     ORDER BY d.delivery_id DESC
     LIMIT :limit
    """
)

# The endpoint's pending deliveries that failed before, the most recently tried first: what it
# keeps failing on now (through the partial index on its PENDING rows).
FAILING = Statement(
    f"""
    SELECT {_LINE}
      FROM deliveries AS d
      JOIN outbox_events AS e ON e.id = d.event_id
     WHERE d.endpoint_id = :endpoint_id
       AND d.status = 'PENDING'
       AND d.attempts > 0
     ORDER BY d.last_attempt_at DESC NULLS LAST
     LIMIT :limit
    """
)

# Its dead deliveries, newest first (through the partial index on DEAD rows).
DEAD_OF_ENDPOINT = Statement(
    f"""
    SELECT {_LINE}
      FROM deliveries AS d
      JOIN outbox_events AS e ON e.id = d.event_id
     WHERE d.endpoint_id = :endpoint_id
       AND d.status = 'DEAD'
     ORDER BY d.delivery_id DESC
     LIMIT :limit
    """
)


@dataclass(frozen=True)
class Attempt:
    """One attempt as the relay recorded it in the delivery's attempt log."""

    attempt: int | None
    at: datetime | None
    outcome: str | None
    status_code: int | None
    error: str | None  # the receiver's answer or the connection's error: any text
    duration_ms: int | None
    signed_with: tuple[str, ...]  # fingerprints of the keys that signed it, newest first

    @classmethod
    def from_log(cls, entry: dict[str, Any]) -> Attempt:
        at = entry.get("at")
        return cls(
            attempt=entry.get("attempt"),
            at=datetime.fromisoformat(at) if isinstance(at, str) else None,
            outcome=entry.get("outcome"),
            status_code=entry.get("status_code"),
            error=entry.get("error"),
            duration_ms=entry.get("duration_ms"),
            signed_with=tuple((entry.get("signed_with") or "").split()),
        )


@dataclass(frozen=True)
class DeliveryLine:
    """One delivery of an endpoint, with its last attempt."""

    delivery_id: int
    event_id: str
    event_type: str
    payment_id: int
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime
    delivered_at: datetime | None
    last_attempt: Attempt | None


def _line(row: asyncpg.Record) -> DeliveryLine:
    values = dict(row)
    last = values.pop("last_attempt")
    return DeliveryLine(
        **values, last_attempt=None if last is None else Attempt.from_log(json.loads(last))
    )


@dataclass(frozen=True)
class RecentDeliveries:
    latest: list[DeliveryLine]  # among the newest RECENT_WINDOW deliveries of all endpoints
    failing: list[DeliveryLine]  # pending, failed before, the latest tried first
    dead: list[DeliveryLine]  # newest first


async def select_endpoint_deliveries(
    conn: asyncpg.Connection, *, endpoint_id: int, limit: int = 10
) -> RecentDeliveries:
    """An endpoint's latest deliveries, those it keeps failing and its dead ones, `limit` each."""
    found = []
    for statement, extra in (
        (LATEST, {"window": RECENT_WINDOW}),
        (FAILING, {}),
        (DEAD_OF_ENDPOINT, {}),
    ):
        values = statement.args(endpoint_id=endpoint_id, limit=limit, **extra)
        found.append([_line(row) for row in await conn.fetch(statement.sql, *values)])
    return RecentDeliveries(*found)


# -- a payment's events ---------------------------------------------------------------------------
# Each event of a payment (in the order written) with its delivery to each endpoint (by name; a
# removed endpoint's kept ones too) and the latest ATTEMPTS_SHOWN attempts of each.
PAYMENT_EVENTS = Statement(
    """
    SELECT e.event_id::text,
           e.event_type,
           e.created_at,
           e.payload ->> 'sequence' AS sequence,
           coalesce(n.name, d.removed_endpoint) AS endpoint,
           d.endpoint_id IS NULL AND d.delivery_id IS NOT NULL AS endpoint_removed,
           d.status,
           d.attempts,
           CASE WHEN d.status = 'PENDING' THEN d.next_attempt_at END AS next_attempt_at,
           d.delivered_at,
           jsonb_array_length(d.attempt_log) AS logged,
           jsonb_path_query_array(d.attempt_log, '$[last - $before to last]',
                                  jsonb_build_object('before', :shown_before_last::int))::text
               AS attempt_log
      FROM outbox_events AS e
      LEFT JOIN deliveries AS d ON d.event_id = e.id
      LEFT JOIN endpoints AS n ON n.endpoint_id = d.endpoint_id
     WHERE e.aggregate_id = :payment_id
     ORDER BY e.id, 5
    """
)


@dataclass(frozen=True)
class EventDelivery:
    endpoint: str
    endpoint_removed: bool
    status: str
    attempts: int
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    attempt_log: list[Attempt]  # the latest ATTEMPTS_SHOWN, oldest first
    logged: int  # attempts in the log, all of them


@dataclass(frozen=True)
class PaymentEvent:
    event_id: str
    event_type: str
    created_at: datetime
    sequence: str | None
    deliveries: list[EventDelivery]


async def select_payment_events(conn: asyncpg.Connection, *, payment_id: int) -> list[PaymentEvent]:
    """A payment's events, oldest first, each with its deliveries and their latest attempts."""
    values = PAYMENT_EVENTS.args(payment_id=payment_id, shown_before_last=ATTEMPTS_SHOWN - 1)
    events: dict[str, PaymentEvent] = {}
    for row in await conn.fetch(PAYMENT_EVENTS.sql, *values):
        event = events.get(row["event_id"])
        if event is None:
            event = events[row["event_id"]] = PaymentEvent(
                row["event_id"], row["event_type"], row["created_at"], row["sequence"], []
            )
        if row["endpoint"] is not None:
            event.deliveries.append(
                EventDelivery(
                    endpoint=row["endpoint"],
                    endpoint_removed=row["endpoint_removed"],
                    status=row["status"],
                    attempts=row["attempts"],
                    next_attempt_at=row["next_attempt_at"],
                    delivered_at=row["delivered_at"],
                    attempt_log=[Attempt.from_log(a) for a in json.loads(row["attempt_log"])],
                    logged=row["logged"],
                )
            )
    return list(events.values())
