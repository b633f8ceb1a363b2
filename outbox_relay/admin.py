"""`payment-service outbox stats | dead | replay`: look at and operate the outbox."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from outbox_relay import outbox
from payment_service.config import Settings
from payment_service.database import connect

T = TypeVar("T")


def _with_connection(settings: Settings, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    async def go() -> T:
        conn = await connect(settings.dsn())
        try:
            return await action(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def outbox_stats(settings: Settings, as_json: bool) -> int:
    """Counts by status and the age of the oldest pending event."""
    stats = _with_connection(settings, outbox.select_stats)
    age = stats["oldest_pending_age_seconds"]
    if as_json:
        print(json.dumps(stats))
        return 0
    print(
        f"PENDING    {stats['pending']:>10}  (due {stats['due']}, "
        f"in flight {stats['in_flight']}, retrying {stats['retrying']})"
    )
    print(f"DELIVERED  {stats['delivered']:>10}")
    print(f"DEAD       {stats['dead']:>10}")
    print("oldest pending: " + ("none" if age is None else f"{age:.1f} s"))
    return 0


def outbox_dead(settings: Settings, limit: int, as_json: bool) -> int:
    """List dead events, newest first."""
    if limit < 1:
        print("payment-service: --limit must be at least 1", file=sys.stderr)
        return 2

    async def select(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        return [dict(row) for row in await outbox.select_dead_events(conn, limit=limit)]

    events = _with_connection(settings, select)
    if as_json:
        print(json.dumps(events, default=_json_default))
        return 0
    if not events:
        print("no dead events")
        return 0
    for event in events:
        status = event["last_status_code"] or "-"
        print(
            f"{event['event_id']}  {event['event_type']:<18} payment {event['payment_id']:<8} "
            f"attempts {event['attempts']:<3} last {status}  {event['last_error'] or ''}"
        )
    return 0


def outbox_replay(settings: Settings, event_id: str | None, dead: bool) -> int:
    """Put one dead event (`--event-id`) or every dead event (`--dead`) back in line."""
    wanted: uuid.UUID | None = None
    if event_id is not None:
        try:
            wanted = uuid.UUID(event_id)
        except ValueError:
            print(f"payment-service: --event-id {event_id!r} is not a UUID", file=sys.stderr)
            return 2
    elif not dead:
        print("payment-service: give --event-id ID or --dead", file=sys.stderr)
        return 2

    async def replay(conn: asyncpg.Connection) -> tuple[list[str], str | None]:
        _warn_superseded(await outbox.select_superseding_events(conn, event_id=wanted))
        replayed = await outbox.replay_dead_events(conn, event_id=wanted)
        status = None
        if wanted is not None and not replayed:
            status = await outbox.select_event_status(conn, event_id=wanted)
        return replayed, status

    replayed, status = _with_connection(settings, replay)
    if wanted is not None and not replayed:
        reason = "no such event" if status is None else f"it is {status}, not DEAD"
        print(f"payment-service: event {wanted} was not replayed: {reason}", file=sys.stderr)
        return 1
    print(f"replayed {len(replayed)} event(s)")
    return 0


def _warn_superseded(rows: list[asyncpg.Record]) -> None:
    """Say which dead events are older than what their receivers already got, before replaying.

    They are replayed all the same (a receiver may still need the event, e.g. for its records):
    a receiver that honours `sequence` keeps the newer state it holds.
    """
    later: dict[tuple[str, int, str | None], list[str]] = {}
    for row in rows:
        key = (row["dead_event_id"], row["payment_id"], row["dead_sequence"])
        later.setdefault(key, []).append(
            f"{row['event_id']} ({row['event_type']}, sequence {row['sequence'] or '?'})"
        )
    for (dead_id, payment_id, sequence), delivered in later.items():
        print(
            f"payment-service: warning: event {dead_id} (payment {payment_id}, sequence "
            f"{sequence or '?'}) is older than event(s) of that payment already delivered: "
            f"{', '.join(delivered)}. It is replayed anyway; receivers that honour `sequence` "
            "keep the newer state.",
            file=sys.stderr,
        )
