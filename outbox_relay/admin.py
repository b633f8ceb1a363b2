"""`payment-service outbox stats | dead | replay`: look at and operate the deliveries, per endpoint.

An event is what happened (`outbox_events`); a delivery is sending it to one endpoint
(`deliveries`). These commands read and change deliveries only, each with one whole
statement below (`$n` numbered in place, so the tests can EXPLAIN what runs); the relay's claim
and record statements live in outbox_relay/outbox.py. A command that puts deliveries back in line
NOTIFYs the relays in the same statement, so they pick them up at once.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from payment_service import OUTBOX_CHANNEL
from payment_service.config import Settings
from payment_service.database import run_with_connection
from payment_service.endpoints import EndpointNotFound, select_endpoint, select_endpoints
from payment_service.entry import printable

COUNTS = ("pending", "in_flight", "due", "retrying", "delivered", "dead")

# Deliveries by status per endpoint; PENDING ones also by state (leased, due, failed before),
# and the age of the oldest. Counts every retained row: run when someone asks, never by gauges.
STATS_SQL = """
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

DEAD_SQL = """
SELECT n.name AS endpoint, e.event_id::text, e.event_type, d.aggregate_id AS payment_id,
       d.attempts, d.last_status_code, d.last_error, e.created_at, d.last_attempt_at
  FROM deliveries AS d
  JOIN outbox_events AS e ON e.id = d.event_id
  JOIN endpoints AS n ON n.endpoint_id = d.endpoint_id
 WHERE d.status = 'DEAD'
   AND ($1::bigint IS NULL OR d.endpoint_id = $1)
 ORDER BY d.delivery_id DESC
 LIMIT $2
"""

# Dead deliveries (of one event and/or to one endpoint, or all) back to PENDING, due now, with
# fresh counters; the attempt log is kept.
REPLAY_DEAD_SQL = """
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
       AND ($1::uuid IS NULL OR e.event_id = $1)
       AND ($2::bigint IS NULL OR d.endpoint_id = $2)
 RETURNING e.event_id::text, d.endpoint_id
)
SELECT r.event_id, n.name AS endpoint
  FROM replayed AS r
  JOIN endpoints AS n ON n.endpoint_id = r.endpoint_id
 CROSS JOIN pg_notify($3, '') AS notified
 ORDER BY r.event_id, n.name
"""

# Why an event was not replayed: where its deliveries stand (those of removed endpoints too).
EVENT_DELIVERIES_SQL = """
SELECT coalesce(n.name, d.removed_endpoint) AS endpoint, d.status
  FROM outbox_events AS e
  LEFT JOIN deliveries AS d
         ON d.event_id = e.id
        AND ($2::bigint IS NULL OR d.endpoint_id = $2)
  LEFT JOIN endpoints AS n ON n.endpoint_id = d.endpoint_id
 WHERE e.event_id = $1
 ORDER BY 1
"""

# For dead deliveries (as REPLAY_DEAD_SQL selects them), the later events of the same payment
# already delivered to the same endpoint: replaying sends that endpoint an older state.
SUPERSEDING_SQL = """
SELECT n.name                       AS endpoint,
       dead_e.event_id::text        AS dead_event_id,
       dead.aggregate_id            AS payment_id,
       dead_e.payload ->> 'sequence' AS dead_sequence,
       later_e.event_id::text       AS event_id,
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
   AND ($1::uuid IS NULL OR dead_e.event_id = $1)
   AND ($2::bigint IS NULL OR dead.endpoint_id = $2)
 ORDER BY dead.event_id, n.name, later.event_id
"""

# `replay --endpoint N --since T [--until T]`: every event of N's types created in [since, until)
# gets a delivery to N that is PENDING and due now, with fresh counters: a new one for an event N
# never had one for (created before it subscribed, or while it was DISABLED), the existing one put
# back in line otherwise (delivered ones included; the attempt log is kept). Same event, same
# event_id, so receivers dedupe on webhook-id as ever. Inserted in event order.
# The events are locked FOR KEY SHARE as they are read, before any delivery is written: the
# relay's housekeeping skips a locked event, so it cannot delete one between this read and the
# insert (a foreign-key error) or just after it (the cascade taking the new delivery with it). An
# event housekeeping deleted first is simply not in the range.
REPLAY_RANGE_SQL = """
WITH wanted AS (
    SELECT e.id, e.aggregate_id
      FROM outbox_events AS e
     WHERE e.created_at >= $2
       AND ($3::timestamptz IS NULL OR e.created_at < $3)
       AND endpoint_wants($4, e.event_type)
       FOR KEY SHARE
), upserted AS (
    INSERT INTO deliveries AS d (event_id, endpoint_id, aggregate_id)
    SELECT w.id, $1, w.aggregate_id
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
       pg_notify($5, '')                 AS notified
  FROM upserted
"""


# -- queries --------------------------------------------------------------------------------------
async def select_stats(conn: asyncpg.Connection) -> dict[str, Any]:
    """Counts of every endpoint's deliveries (see STATS_SQL), with its state and breaker, and the
    totals over all endpoints."""
    found = await select_endpoints(conn)
    counts = {row["endpoint_id"]: row for row in await conn.fetch(STATS_SQL)}
    per_endpoint = []
    for endpoint in found:
        row = counts.get(endpoint.endpoint_id)
        per_endpoint.append(
            {
                "name": endpoint.name,
                "url": endpoint.url,
                "state": endpoint.state,
                "breaker": endpoint.breaker,
                **{key: int(row[key]) if row else 0 for key in COUNTS},
                "oldest_pending_age_seconds": row["oldest_pending_age_seconds"] if row else None,
            }
        )
    ages = [e["oldest_pending_age_seconds"] for e in per_endpoint]
    return {
        **{key: sum(e[key] for e in per_endpoint) for key in COUNTS},
        "oldest_pending_age_seconds": max((a for a in ages if a is not None), default=None),
        "endpoints": per_endpoint,
    }


async def _endpoint_id(conn: asyncpg.Connection, name: str | None) -> int | None:
    """The id of the endpoint named `name` (None: every endpoint); EndpointNotFound if none."""
    return None if name is None else (await select_endpoint(conn, name)).endpoint_id


@dataclass
class RangeReplay:
    added: int  # deliveries the endpoint never had
    again: int  # existing deliveries put back in line
    state: str  # the endpoint's state: only ACTIVE sends them now


async def replay_range(
    conn: asyncpg.Connection, *, endpoint: str, since: datetime, until: datetime | None
) -> RangeReplay:
    """Make `endpoint` receive every event of its types created in [since, until) again."""
    target = await select_endpoint(conn, endpoint)
    row = await conn.fetchrow(
        REPLAY_RANGE_SQL,
        target.endpoint_id,
        since,
        until,
        list(target.event_types),
        OUTBOX_CHANNEL,
    )
    assert row is not None
    return RangeReplay(int(row["added"]), int(row["again"]), target.state)


# -- commands -------------------------------------------------------------------------------------
def _fail(message: str, code: int = 2) -> int:
    print(f"payment-service: {printable(message)}", file=sys.stderr)
    return code


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def outbox_stats(settings: Settings, as_json: bool) -> int:
    """Deliveries per endpoint by status, the oldest pending age, breaker and state."""
    stats = run_with_connection(settings.dsn(), select_stats)
    if as_json:
        print(json.dumps(stats))
        return 0
    header = ("endpoint", "state", "breaker", *COUNTS, "oldest pending")

    def row(name: str, state: str, breaker: str, counts: dict[str, Any]) -> tuple[str, ...]:
        numbers = (str(counts[key]) for key in COUNTS)
        return (name, state, breaker, *numbers, _age(counts["oldest_pending_age_seconds"]))

    rows = [row(e["name"], e["state"], e["breaker"], e) for e in stats["endpoints"]]
    rows.append(row("all", "", "", stats))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for line in (header, *rows):
        print(
            printable(
                "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            ).rstrip()
        )
    return 0


def outbox_dead(settings: Settings, limit: int, as_json: bool, endpoint: str | None = None) -> int:
    """List dead deliveries (to one endpoint, or all), newest first."""
    if limit < 1:
        return _fail("--limit must be at least 1")

    async def select(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        rows = await conn.fetch(DEAD_SQL, await _endpoint_id(conn, endpoint), limit)
        return [dict(row) for row in rows]

    try:
        dead = run_with_connection(settings.dsn(), select)
    except EndpointNotFound as error:
        return _fail(str(error))
    if as_json:
        print(json.dumps(dead, default=_json_default))
        return 0
    if not dead:
        print("no dead deliveries")
        return 0
    for d in dead:
        # last_error holds the receiver's answer: printed escaped, it cannot drive the terminal
        print(
            printable(
                f"{d['endpoint']:<14} {d['event_id']}  {d['event_type']:<18} payment "
                f"{d['payment_id']:<8} attempts {d['attempts']:<3} last "
                f"{d['last_status_code'] or '-'}  {d['last_error'] or ''}"
            )
        )
    return 0


def outbox_replay(
    settings: Settings, event_id: str | None, dead: bool, endpoint: str | None = None
) -> int:
    """Put the dead deliveries of one event (`--event-id`) or every dead delivery (`--dead`),
    to one endpoint or all, back in line."""
    wanted: uuid.UUID | None = None
    if event_id is not None:
        try:
            wanted = uuid.UUID(event_id)
        except ValueError:
            return _fail(f"--event-id {event_id!r} is not a UUID")
    elif not dead:
        return _fail("give --event-id ID or --dead")

    async def replay(conn: asyncpg.Connection) -> tuple[list[asyncpg.Record], list[str]]:
        target = await _endpoint_id(conn, endpoint)
        _warn_superseded(await conn.fetch(SUPERSEDING_SQL, wanted, target))
        replayed = await conn.fetch(REPLAY_DEAD_SQL, wanted, target, OUTBOX_CHANNEL)
        standing = []
        if wanted is not None and not replayed:
            standing = [
                f"{row['endpoint']} {row['status']}"
                for row in await conn.fetch(EVENT_DELIVERIES_SQL, wanted, target)
                if row["endpoint"] is not None
            ]
            if not standing and not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM outbox_events WHERE event_id = $1)", wanted
            ):
                standing = ["no such event"]
        return replayed, standing

    try:
        replayed, standing = run_with_connection(settings.dsn(), replay)
    except EndpointNotFound as error:
        return _fail(str(error))
    if wanted is not None and not replayed:
        why = ", ".join(standing) or (
            f"it has no delivery to {endpoint}" if endpoint else "it has no delivery"
        )
        return _fail(f"event {wanted} was not replayed: no DEAD delivery ({why})", 1)
    to = sorted({row["endpoint"] for row in replayed})
    print(
        printable(
            f"replayed {len(replayed)} delivery(ies)" + (f" to {', '.join(to)}" if to else "")
        )
    )
    return 0


def parse_time(text: str, option: str) -> datetime:
    """An ISO 8601 time with an offset (`Z` allowed), in UTC; ValueError naming `option`
    otherwise (also for a time outside years 1-9999 once in UTC, which no event can have)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{option} {text!r} is not an ISO 8601 time (years 1-9999, e.g. "
            "2025-01-31T09:00:00+05:30)"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{option} {text!r} has no offset: add one, e.g. +00:00 or Z")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{option} {text!r} is out of range (years 1-9999 in UTC)") from None


def outbox_replay_range(settings: Settings, *, endpoint: str, since: str, until: str | None) -> int:
    """`replay --endpoint N --since T [--until T]`: see REPLAY_RANGE_SQL."""
    try:
        start = parse_time(since, "--since")
        end = None if until is None else parse_time(until, "--until")
    except ValueError as error:
        return _fail(str(error))
    if end is not None and end <= start:
        return _fail("--until must be later than --since")

    async def replay(conn: asyncpg.Connection) -> RangeReplay:
        return await replay_range(conn, endpoint=endpoint, since=start, until=end)

    try:
        done = run_with_connection(settings.dsn(), replay)
    except EndpointNotFound as error:
        return _fail(str(error))
    print(
        printable(
            f"{endpoint}: {done.added + done.again} event(s) in line again "
            f"({done.added} it never had, {done.again} sent or tried before)"
        )
    )
    if done.state != "ACTIVE":
        print(
            printable(
                f"payment-service: note: {endpoint} is {done.state}; they wait until "
                f"`payment-service endpoints {'enable' if done.state == 'DISABLED' else 'resume'} "
                f"{endpoint}`"
            ),
            file=sys.stderr,
        )
    return 0


def _warn_superseded(rows: list[asyncpg.Record]) -> None:
    """Say which dead deliveries are older than what their endpoint already got, before replaying.

    They are replayed all the same (a receiver may still need the event, e.g. for its records):
    a receiver that honours `sequence` keeps the newer state it holds.
    """
    later: dict[tuple[str, str, int, str | None], list[str]] = {}
    for row in rows:
        key = (row["endpoint"], row["dead_event_id"], row["payment_id"], row["dead_sequence"])
        later.setdefault(key, []).append(
            f"{row['event_id']} ({row['event_type']}, sequence {row['sequence'] or '?'})"
        )
    for (endpoint, dead_id, payment_id, sequence), delivered in later.items():
        print(
            printable(
                f"payment-service: warning: event {dead_id} (payment {payment_id}, sequence "
                f"{sequence or '?'}) is older than event(s) of that payment already delivered "
                f"to {endpoint}: {', '.join(delivered)}. It is replayed anyway; receivers that "
                "honour `sequence` keep the newer state."
            ),
            file=sys.stderr,
        )
