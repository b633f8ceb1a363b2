"""Housekeeping: delete delivered deliveries past retention, the events no delivery needs any
more, and expired idempotency keys.

One relay at a time does it (a session advisory lock; the others skip the pass), in small
batches, each its own short statement, so it never holds long locks or bloats one transaction.
The keys are the API's table: their batch is the schema's `purge_expired_idempotency_keys`
(db/migrations/0005), so the relay carries no SQL of that table.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from outbox_relay import outbox

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000  # rows per DELETE
MAX_BATCHES_PER_PASS = 100  # a pass stops after this many batches of each kind; the next continues
PURGE_EXPIRED_KEYS_SQL = "SELECT purge_expired_idempotency_keys($1)"


@dataclass(frozen=True)
class HousekeepingResult:
    ran: bool  # False when another relay held the lock
    deliveries_deleted: int = 0
    events_deleted: int = 0
    keys_deleted: int = 0


async def housekeep(
    conn: asyncpg.Connection, *, retention_hours: float, batch_size: int = BATCH_SIZE
) -> HousekeepingResult:
    """One pass, unless another relay is doing one right now."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", outbox.HOUSEKEEPING_LOCK_ID):
        return HousekeepingResult(ran=False)
    try:
        deliveries = await _in_batches(
            lambda: outbox.delete_delivered_deliveries(
                conn, older_than_hours=retention_hours, limit=batch_size
            ),
            batch_size,
        )
        events = await _in_batches(
            lambda: outbox.delete_old_events(
                conn, older_than_hours=retention_hours, limit=batch_size
            ),
            batch_size,
        )
        keys = await _in_batches(
            lambda: purge_expired_idempotency_keys(conn, limit=batch_size), batch_size
        )
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", outbox.HOUSEKEEPING_LOCK_ID)
    if deliveries or events or keys:
        logger.info(
            "housekeeping deleted old rows",
            extra={
                "delivered_deliveries": deliveries,
                "events": events,
                "idempotency_keys": keys,
            },
        )
    return HousekeepingResult(
        ran=True, deliveries_deleted=deliveries, events_deleted=events, keys_deleted=keys
    )


async def purge_expired_idempotency_keys(conn: asyncpg.Connection, *, limit: int) -> int:
    """Delete up to `limit` idempotency keys past their expiry; how many were deleted."""
    deleted = await conn.fetchval(PURGE_EXPIRED_KEYS_SQL, limit)
    return int(deleted)


async def _in_batches(delete_batch: Callable[[], Awaitable[int]], batch_size: int) -> int:
    total = 0
    for _ in range(MAX_BATCHES_PER_PASS):
        deleted = await delete_batch()
        total += deleted
        if deleted < batch_size:
            break
    return total
