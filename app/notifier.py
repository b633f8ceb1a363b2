"""Wakes the relays after commits: one NOTIFY per burst, outside the payment transactions.

PostgreSQL serialises the commits of notifying transactions on one server-wide lock, held through
the WAL flush; a NOTIFY inside every payment transaction capped the whole service at one commit
per disk flush (docs/benchmarks.md measures it). So a committed change only `poke()`s this
notifier, and a single task per process sends `pg_notify` on its own connection whenever pokes
arrived since its last one. A NOTIFY lost to a crash costs the relay at most one poll interval
(RELAY_POLL_INTERVAL): the outbox row, not the notification, is what is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from payment_service import OUTBOX_CHANNEL
from payment_service.database import acquire
from payment_service.sql import Statement

logger = logging.getLogger(__name__)

FAILURE_PAUSE_SECONDS = 1.0  # after a failed NOTIFY (database down): the relay polls meanwhile
NOTIFY = Statement("SELECT pg_notify(:channel, '')")


class OutboxNotifier:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox-notifier")

    def poke(self) -> None:
        """Ask for a NOTIFY soon; many pokes before it is sent make one."""
        self._pending.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._pending.wait()
            self._pending.clear()
            try:
                async with acquire(self._pool) as conn:
                    await conn.execute(NOTIFY.sql, *NOTIFY.args(channel=OUTBOX_CHANNEL))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the relay's poll covers a missed wake-up
                logger.debug("NOTIFY failed", extra={"error": type(error).__name__})
                await asyncio.sleep(FAILURE_PAUSE_SECONDS)
