"""Housekeeping: delete delivered deliveries past retention, the events no delivery needs any
more, and expired idempotency keys.

One relay at a time does it (a session advisory lock; the others skip the pass). A pass goes on
while it finds work, in rounds; each round is a few short statements of at most `batch_size`
rows each, never a long lock or one transaction that grows with the backlog:
- the oldest deliveries delivered past retention are deleted, and their events, if that left
  them unused (the common case: an event goes with its last delivery);
- a sweep reads the next window of old events in id order and deletes the unused ones (events
  no endpoint wanted, or whose deliveries `endpoints remove` dropped); it reads each old event
  once a pass, never the growing head of events kept for their pending or dead deliveries;
- expired idempotency keys go, through the schema's `purge_expired_idempotency_keys`
  (db/migrations/0005), so the relay carries no SQL of the API's table;
- the payment gateway's webhooks (`gateway_events`, each stored once by its id) received more
  than GATEWAY_EVENTS_RETENTION_DAYS ago go, oldest first (payment_service.money.operations).
Between rounds the pass rests as long as the round took, so it uses at most half of one
connection's time and backs off as the database slows down; it stops at the relay's stop (the
round in progress finishes its statements first). A pass ends once every kind is done: a short
batch of deliveries, of keys and of webhooks, and a sweep that reached events not yet past
retention.

Unused events are locked (`SKIP LOCKED`) and then deleted after a fresh look, in one short
transaction, so an `outbox replay --since` that is adding a delivery for an old event (it holds
the event FOR KEY SHARE) keeps it, and never loses its delivery to the cascade.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from outbox_relay import outbox
from outbox_relay.state import wait_for
from payment_service.database import advisory_unlock, try_advisory_lock
from payment_service.money import operations as gateway_operations
from payment_service.sql import Statement

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000  # rows per statement: deliveries and keys deleted, events swept
MIN_REST_SECONDS = 0.005  # the least rest between rounds: other tasks and sessions get a turn
PURGE_EXPIRED_KEYS = Statement("SELECT purge_expired_idempotency_keys(:limit)")


@dataclass(frozen=True)
class HousekeepingResult:
    ran: bool  # False when another relay held the lock
    deliveries_deleted: int = 0
    events_deleted: int = 0
    keys_deleted: int = 0
    gateway_events_deleted: int = 0
    rounds: int = 0
    stopped: bool = False  # the pass ended at the stop event, with work left


async def housekeep(
    conn: asyncpg.Connection,
    *,
    retention_hours: float,
    gateway_events_retention_days: float | None = None,
    batch_size: int = BATCH_SIZE,
    stop: asyncio.Event | None = None,
) -> HousekeepingResult:
    """One pass, unless another relay is doing one right now; it ends when nothing is left to
    delete, or at `stop`. The gateway's webhooks are deleted only when their retention is
    given."""
    if not await try_advisory_lock(conn, outbox.HOUSEKEEPING_LOCK_ID):
        return HousekeepingResult(ran=False)
    try:
        result = await _Pass(
            conn, retention_hours, gateway_events_retention_days, batch_size,
            stop or asyncio.Event(),
        ).run()  # fmt: skip
    finally:
        await advisory_unlock(conn, outbox.HOUSEKEEPING_LOCK_ID)
    if (
        result.deliveries_deleted
        or result.events_deleted
        or result.keys_deleted
        or result.gateway_events_deleted
    ):
        logger.info(
            "housekeeping deleted old rows",
            extra={
                "delivered_deliveries": result.deliveries_deleted,
                "events": result.events_deleted,
                "idempotency_keys": result.keys_deleted,
                "gateway_events": result.gateway_events_deleted,
                "rounds": result.rounds,
                "stopped": result.stopped,
            },
        )
    return result


class _Pass:
    def __init__(
        self,
        conn: asyncpg.Connection,
        retention_hours: float,
        gateway_events_retention_days: float | None,
        batch_size: int,
        stop: asyncio.Event,
    ) -> None:
        self.conn = conn
        self.retention_hours = retention_hours
        self.gateway_events_retention_days = gateway_events_retention_days
        self.gateway_events = 0
        self.gateway_events_left = gateway_events_retention_days is not None
        self.batch_size = batch_size
        self.stop = stop
        self.deliveries = self.events = self.keys = self.rounds = 0
        self.deliveries_left = self.sweep_left = self.keys_left = True
        self.swept_to = 0  # the sweep's cursor: the last event id it read

    async def run(self) -> HousekeepingResult:
        while self.deliveries_left or self.sweep_left or self.keys_left or self.gateway_events_left:
            if self.stop.is_set():
                break
            started = time.monotonic()
            await self._round()
            self.rounds += 1
            rest = max(time.monotonic() - started, MIN_REST_SECONDS)
            await wait_for(self.stop, rest)
        return HousekeepingResult(
            ran=True,
            deliveries_deleted=self.deliveries,
            events_deleted=self.events,
            keys_deleted=self.keys,
            gateway_events_deleted=self.gateway_events,
            rounds=self.rounds,
            stopped=self.stop.is_set(),
        )

    async def _round(self) -> None:
        candidates: list[int] = []
        if self.deliveries_left:
            event_ids = await outbox.delete_delivered_deliveries(
                self.conn, older_than_hours=self.retention_hours, limit=self.batch_size
            )
            self.deliveries += len(event_ids)
            self.deliveries_left = len(event_ids) == self.batch_size
            candidates += event_ids
        if self.sweep_left:
            window = await outbox.select_event_window(
                self.conn,
                after=self.swept_to,
                older_than_hours=self.retention_hours,
                limit=self.batch_size,
            )
            old = [row for row in window if row["past_retention"]]
            candidates += [row["id"] for row in old if row["unused"]]
            if window:
                self.swept_to = window[-1]["id"]
            # Ids follow creation time (to within a transaction's length): past the first event
            # still within retention, the rest of the table is newer. An event just short of the
            # line waits for the next pass.
            self.sweep_left = len(old) == self.batch_size
        if candidates:
            self.events += await self._delete_unused_events(candidates)
        if self.keys_left:
            keys = await purge_expired_idempotency_keys(self.conn, limit=self.batch_size)
            self.keys += keys
            self.keys_left = keys == self.batch_size
        if self.gateway_events_left:
            assert self.gateway_events_retention_days is not None
            deleted = await gateway_operations.delete_old_events(
                self.conn, older_than_days=self.gateway_events_retention_days, limit=self.batch_size
            )
            self.gateway_events += deleted
            self.gateway_events_left = deleted == self.batch_size

    async def _delete_unused_events(self, event_ids: Iterable[int]) -> int:
        unique = sorted(set(event_ids))
        async with self.conn.transaction():
            locked = await outbox.lock_unused_events(
                self.conn, event_ids=unique, older_than_hours=self.retention_hours
            )
            if not locked:
                return 0
            return await outbox.delete_unused_events(self.conn, event_ids=locked)


async def purge_expired_idempotency_keys(conn: asyncpg.Connection, *, limit: int) -> int:
    """Delete up to `limit` idempotency keys past their expiry; how many were deleted."""
    deleted = await conn.fetchval(PURGE_EXPIRED_KEYS.sql, *PURGE_EXPIRED_KEYS.args(limit=limit))
    return int(deleted)
