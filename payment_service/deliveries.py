"""Deliveries (table `deliveries`): what operators read and do about them, and its SQL.

An event is what happened (`outbox_events`); a delivery is sending it to one endpoint. The API's
write statement inserts deliveries (the fan-out, app.payments), the relay leases, sends and
records them (outbox_relay.outbox), and removing an endpoint deletes or keeps its own
(payment_service.endpoints). This module holds the rest, which `payment-service outbox stats |
dead | replay` (payment_cli.outbox_cli) and the admin API (app.admin) are thin layers over:
an event's deliveries, the counts per endpoint, the dead deliveries, and replays (of dead
deliveries, of an event, of a range of events to one endpoint). Each is one whole statement with
named placeholders (payment_service.sql), so the tests EXPLAIN what runs. A replay puts deliveries
back in line and NOTIFYs the relays in the same statement, so they pick them up at once.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from payment_service import OUTBOX_CHANNEL
from payment_service.endpoints import select_endpoint, select_endpoints
from payment_service.sql import Statement

# One event (by its `event_id`, the callbacks' `webhook-id`) with its delivery to every endpoint,
# as a JSON document built in SQL: GET /admin/events/{event_id}/deliveries sends it as is.
EVENT_DELIVERIES = Statement(
    """
    SELECT jsonb_build_object(
               'event_id',   e.event_id,
               'event_type', e.event_type,
               'payment_id', e.aggregate_id,
               'created_at', e.created_at,
               'deliveries', coalesce(
                   (SELECT jsonb_agg(jsonb_build_object(
                               'endpoint',         coalesce(n.name, d.removed_endpoint),
                               'endpoint_removed', d.endpoint_id IS NULL,
                               'status',           d.status,
                               'attempts',         d.attempts,
                               'counted_attempts', d.counted_attempts,
                               'next_attempt_at',  CASE WHEN d.status = 'PENDING'
                                                        THEN d.next_attempt_at END,
                               'last_status_code', d.last_status_code,
                               'last_error',       d.last_error,
                               'last_attempt_at',  d.last_attempt_at,
                               'delivered_at',     d.delivered_at,
                               'attempt_log',      d.attempt_log)
                             ORDER BY coalesce(n.name, d.removed_endpoint),
                                      d.endpoint_id NULLS FIRST)
                      FROM deliveries AS d
                      LEFT JOIN endpoints AS n ON n.endpoint_id = d.endpoint_id
                     WHERE d.event_id = e.id),
                   '[]'::jsonb))
      FROM outbox_events AS e
     WHERE e.event_id = :event_id
    """
)

# Deliveries by status per endpoint; PENDING ones also by state (leased, due, failed before),
# and the age of the oldest. Counts every retained row: run when someone asks, never by gauges.
STATS = Statement(
    """
    SELECT endpoint_id,
           count(*) FILTER (WHERE status = 'PENDING') AS pending,
           count(*) FILTER (WHERE status = 'PENDING' AND locked_until > now()) AS in_flight,
           count(*) FILTER (WHERE status = 'PENDING'
                              AND next_attempt_at <= now()
                              AND (locked_until IS NULL OR locked_until <= now())) AS due,
           count(*) FILTER (WHERE status = 'PENDING' AND attempts > 0) AS retrying,
           count(*) FILTER (WHERE status = 'DELIVERED') AS delivered,
           count(*) FILTER (WHERE status = 'DEAD') AS dead,
           extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'PENDING'))::float8
               AS oldest_pending_age_seconds
      FROM deliveries
     GROUP BY endpoint_id
    """
)

# The newest `:limit` dead deliveries, to one endpoint (`:endpoint_id`) or every one (NULL).
DEAD = Statement(
    """
    SELECT n.name AS endpoint, e.event_id::text, e.event_type, d.aggregate_id AS payment_id,
           d.attempts, d.last_status_code, d.last_error, e.created_at, d.last_attempt_at
      FROM deliveries AS d
      JOIN outbox_events AS e ON e.id = d.event_id
      JOIN endpoints AS n ON n.endpoint_id = d.endpoint_id
     WHERE d.status = 'DEAD'
       AND (:endpoint_id::bigint IS NULL OR d.endpoint_id = :endpoint_id)
     ORDER BY d.delivery_id DESC
     LIMIT :limit
    """
)

# Dead deliveries (of one event and/or to one endpoint, or all: NULL for either) back to PENDING,
# due now, with fresh counters; the attempt log is kept.
REPLAY_DEAD = Statement(
    """
    WITH replayed AS (
        UPDATE deliveries AS d
           SET status = 'PENDING',
               attempts = 0,
               counted_attempts = 0,
               next_attempt_at = now(),
               locked_until = NULL,
               claim_token = NULL
          FROM outbox_events AS e
         WHERE e.id = d.event_id
           AND d.status = 'DEAD'
           AND (:event_id::uuid IS NULL OR e.event_id = :event_id)
           AND (:endpoint_id::bigint IS NULL OR d.endpoint_id = :endpoint_id)
     RETURNING e.event_id::text, d.endpoint_id
    )
    SELECT r.event_id, n.name AS endpoint
      FROM replayed AS r
      JOIN endpoints AS n ON n.endpoint_id = r.endpoint_id
     CROSS JOIN pg_notify(:channel, '') AS notified
     ORDER BY r.event_id, n.name
    """
)

# Where an event's deliveries stand (those of removed endpoints too), to one endpoint or all: why
# it was not replayed. No row: no such event; one row without an endpoint: it has no delivery.
EVENT_STANDING = Statement(
    """
    SELECT coalesce(n.name, d.removed_endpoint) AS endpoint, d.status
      FROM outbox_events AS e
      LEFT JOIN deliveries AS d
             ON d.event_id = e.id
            AND (:endpoint_id::bigint IS NULL OR d.endpoint_id = :endpoint_id)
      LEFT JOIN endpoints AS n ON n.endpoint_id = d.endpoint_id
     WHERE e.event_id = :event_id
     ORDER BY 1
    """
)

# For dead deliveries (as REPLAY_DEAD selects them), the later events of the same payment
# already delivered to the same endpoint: replaying sends that endpoint an older state.
SUPERSEDING = Statement(
    """
    SELECT n.name                        AS endpoint,
           dead_e.event_id::text         AS dead_event_id,
           dead.aggregate_id             AS payment_id,
           dead_e.payload ->> 'sequence' AS dead_sequence,
           later_e.event_id::text        AS event_id,
           later_e.event_type,
           later_e.payload ->> 'sequence' AS sequence
      FROM deliveries AS dead
      JOIN outbox_events AS dead_e ON dead_e.id = dead.event_id
      JOIN endpoints AS n ON n.endpoint_id = dead.endpoint_id
      JOIN deliveries AS later
        ON later.endpoint_id = dead.endpoint_id
       AND later.aggregate_id = dead.aggregate_id
       AND later.event_id > dead.event_id
       AND later.status = 'DELIVERED'
      JOIN outbox_events AS later_e ON later_e.id = later.event_id
     WHERE dead.status = 'DEAD'
       AND (:event_id::uuid IS NULL OR dead_e.event_id = :event_id)
       AND (:endpoint_id::bigint IS NULL OR dead.endpoint_id = :endpoint_id)
     ORDER BY dead.event_id, n.name, later.event_id
    """
)

# `replay --endpoint N --since T [--until T]`: every event of N's types created in [since, until)
# gets a delivery to N that is PENDING and due now, with fresh counters: a new one for an event N
# never had one for (created before it subscribed, or while it was DISABLED), the existing one put
# back in line otherwise (delivered ones included; the attempt log is kept). Same event, same
# event_id, so receivers dedupe on webhook-id as ever. Inserted in event order.
# The events are locked FOR KEY SHARE as they are read, before any delivery is written: the
# relay's housekeeping skips a locked event, so it cannot delete one between this read and the
# insert (a foreign-key error) or just after it (the cascade taking the new delivery with it). An
# event housekeeping deleted first is simply not in the range.
REPLAY_RANGE = Statement(
    """
    WITH wanted AS (
        SELECT e.id, e.aggregate_id
          FROM outbox_events AS e
         WHERE e.created_at >= :since
           AND (:until::timestamptz IS NULL OR e.created_at < :until)
           AND endpoint_wants(:event_types, e.event_type)
           FOR KEY SHARE
    ), upserted AS (
        INSERT INTO deliveries AS d (event_id, endpoint_id, aggregate_id)
        SELECT w.id, :endpoint_id, w.aggregate_id
          FROM wanted AS w
         ORDER BY w.id
        ON CONFLICT (event_id, endpoint_id) DO UPDATE
           SET status = 'PENDING',
               attempts = 0,
               counted_attempts = 0,
               next_attempt_at = now(),
               locked_until = NULL,
               claim_token = NULL,
               delivered_at = NULL
     RETURNING (d.xmax = 0) AS added
    )
    SELECT count(*) FILTER (WHERE added)     AS added,
           count(*) FILTER (WHERE NOT added) AS again,
           pg_notify(:channel, '')           AS notified
      FROM upserted
    """
)


# -- an event's deliveries ------------------------------------------------------------------------
async def select_event_deliveries(conn: asyncpg.Connection, *, event_id: uuid.UUID) -> str | None:
    """An event with its delivery to every endpoint, by endpoint name: state, attempts and the log
    of every attempt (time, outcome, status code, error, duration) as the relay recorded it, and
    whether the endpoint has since been removed (its delivered deliveries stay as history), as a
    JSON document. None when no such event exists."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        EVENT_DELIVERIES.sql, *EVENT_DELIVERIES.args(event_id=event_id)
    )


# -- counts per endpoint --------------------------------------------------------------------------
COUNTS = ("pending", "in_flight", "due", "retrying", "delivered", "dead")


@dataclass(frozen=True)
class DeliveryCounts:
    """Deliveries by status (PENDING ones also by state) and the oldest pending one's age."""

    pending: int = 0
    in_flight: int = 0  # leased by a relay now
    due: int = 0  # waiting for a relay to lease them
    retrying: int = 0  # tried before
    delivered: int = 0
    dead: int = 0
    oldest_pending_age_seconds: float | None = None  # None: nothing pending

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EndpointDeliveries:
    """One endpoint's deliveries counted, with its state and breaker."""

    name: str
    url: str | None
    state: str
    breaker: str
    counts: DeliveryCounts

    def public(self) -> dict[str, Any]:
        """What `outbox stats --json` shows of it."""
        return {
            "name": self.name,
            "url": self.url,
            "state": self.state,
            "breaker": self.breaker,
            **self.counts.public(),
        }


@dataclass(frozen=True)
class Stats:
    totals: DeliveryCounts  # over every endpoint; the oldest pending age is the largest
    endpoints: list[EndpointDeliveries] = field(default_factory=list)  # by name

    def public(self) -> dict[str, Any]:
        """What `outbox stats --json` shows: the totals, then `endpoints`."""
        return {**self.totals.public(), "endpoints": [e.public() for e in self.endpoints]}


async def select_stats(conn: asyncpg.Connection) -> Stats:
    """Every endpoint's deliveries counted (STATS), with its state and breaker, and the totals."""
    found = await select_endpoints(conn)
    rows = {row["endpoint_id"]: row for row in await conn.fetch(STATS.sql, *STATS.args())}
    per_endpoint = []
    for endpoint in found:
        row = rows.get(endpoint.endpoint_id)
        counts = DeliveryCounts() if row is None else _counts(row)
        per_endpoint.append(
            EndpointDeliveries(
                endpoint.name, endpoint.url, endpoint.state, endpoint.breaker, counts
            )
        )
    ages = [e.counts.oldest_pending_age_seconds for e in per_endpoint]
    totals = DeliveryCounts(
        **{key: sum(getattr(e.counts, key) for e in per_endpoint) for key in COUNTS},
        oldest_pending_age_seconds=max((a for a in ages if a is not None), default=None),
    )
    return Stats(totals, per_endpoint)


def _counts(row: asyncpg.Record) -> DeliveryCounts:
    return DeliveryCounts(
        **{key: int(row[key]) for key in COUNTS},
        oldest_pending_age_seconds=row["oldest_pending_age_seconds"],
    )


# -- dead deliveries ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeadDelivery:
    endpoint: str
    event_id: str
    event_type: str
    payment_id: int
    attempts: int
    last_status_code: int | None
    last_error: str | None  # the receiver's answer, or the connection's error: any text
    created_at: datetime  # the event's
    last_attempt_at: datetime | None

    def public(self) -> dict[str, Any]:
        return asdict(self)


async def _endpoint_id(conn: asyncpg.Connection, name: str | None) -> int | None:
    """The id of the endpoint named `name` (None: every endpoint); EndpointNotFound if none."""
    return None if name is None else (await select_endpoint(conn, name)).endpoint_id


async def select_dead(
    conn: asyncpg.Connection, *, endpoint: str | None, limit: int
) -> list[DeadDelivery]:
    """The newest `limit` dead deliveries, to `endpoint` (None: every endpoint), newest first;
    EndpointNotFound when no endpoint has that name."""
    values = DEAD.args(endpoint_id=await _endpoint_id(conn, endpoint), limit=limit)
    return [DeadDelivery(**dict(row)) for row in await conn.fetch(DEAD.sql, *values)]


# -- replays --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replayed:
    event_id: str
    endpoint: str


@dataclass(frozen=True)
class LaterEvent:
    """An event already delivered to an endpoint, later than one of its dead deliveries."""

    event_id: str
    event_type: str
    sequence: str | None  # the payment's `sequence` in the callback body


@dataclass(frozen=True)
class Superseded:
    """A dead delivery older than events of the same payment its endpoint already got: replayed,
    it sends the endpoint an older state (a receiver that honours `sequence` keeps the newer)."""

    endpoint: str
    event_id: str
    payment_id: int
    sequence: str | None
    delivered: tuple[LaterEvent, ...]


@dataclass(frozen=True)
class Standing:
    """Where one of an event's deliveries stands."""

    endpoint: str
    status: str


@dataclass(frozen=True)
class DeadReplay:
    superseded: list[Superseded]  # read before the replay
    replayed: list[Replayed]  # by event, then endpoint
    # Only for one event that had nothing to replay: where its deliveries stand (none: it has no
    # delivery, to the endpoint asked about or at all) and whether the event exists.
    standing: list[Standing] = field(default_factory=list)
    event_found: bool = True


async def replay_dead(
    conn: asyncpg.Connection, *, event_id: uuid.UUID | None, endpoint: str | None
) -> DeadReplay:
    """Put the dead deliveries of one event (`event_id`; None: of every event), to `endpoint`
    (None: every endpoint), back in line, due now, with fresh counters. Says first which of them
    are older than what their endpoint already got (they are replayed all the same: a receiver
    may still need the event, e.g. for its records). EndpointNotFound when no endpoint has that
    name."""
    target = await _endpoint_id(conn, endpoint)
    selected = {"event_id": event_id, "endpoint_id": target}
    superseded = _superseded(await conn.fetch(SUPERSEDING.sql, *SUPERSEDING.args(**selected)))
    rows = await conn.fetch(REPLAY_DEAD.sql, *REPLAY_DEAD.args(**selected, channel=OUTBOX_CHANNEL))
    replayed = [Replayed(row["event_id"], row["endpoint"]) for row in rows]
    if event_id is None or replayed:
        return DeadReplay(superseded, replayed)
    rows = await conn.fetch(EVENT_STANDING.sql, *EVENT_STANDING.args(**selected))
    standing = [Standing(row["endpoint"], row["status"]) for row in rows if row["endpoint"]]
    return DeadReplay(superseded, replayed, standing, event_found=bool(rows))


def _superseded(rows: list[asyncpg.Record]) -> list[Superseded]:
    """SUPERSEDING's rows, one per dead delivery with the later events it is older than."""
    later: dict[tuple[str, str, int, str | None], list[LaterEvent]] = {}
    for row in rows:
        key = (row["endpoint"], row["dead_event_id"], row["payment_id"], row["dead_sequence"])
        later.setdefault(key, []).append(
            LaterEvent(row["event_id"], row["event_type"], row["sequence"])
        )
    return [
        Superseded(endpoint, event_id, payment_id, sequence, tuple(delivered))
        for (endpoint, event_id, payment_id, sequence), delivered in later.items()
    ]


@dataclass(frozen=True)
class RangeReplay:
    added: int  # deliveries the endpoint never had
    again: int  # existing deliveries put back in line
    state: str  # the endpoint's state: only ACTIVE sends them now


async def replay_range(
    conn: asyncpg.Connection, *, endpoint: str, since: datetime, until: datetime | None
) -> RangeReplay:
    """Make `endpoint` receive every event of its types created in [since, until) again
    (REPLAY_RANGE); EndpointNotFound when no endpoint has that name."""
    target = await select_endpoint(conn, endpoint)
    values = REPLAY_RANGE.args(
        endpoint_id=target.endpoint_id,
        since=since,
        until=until,
        event_types=list(target.event_types),
        channel=OUTBOX_CHANNEL,
    )
    row = await conn.fetchrow(REPLAY_RANGE.sql, *values)
    assert row is not None
    return RangeReplay(int(row["added"]), int(row["again"]), target.state)
