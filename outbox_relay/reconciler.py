"""Scheduled reconciliation: every GATEWAY_RECONCILE_INTERVAL seconds, one relay compares our
charges and refunds with the gateway's over the window since the previous run (with an overlap),
and those decided since the window's start whenever they were staged (a payment PENDING at one
run and decided later by the worker or an operator is compared at the next;
payment_service.money.reconcile), and stores the run in `gateway_reconciliations`.

Exactly one relay runs a given pass: a relay that finds a pass due (the interval has passed
since the last run started) opens a connection of its own, takes a session advisory lock on it,
reads the last run again, and runs the pass only if it is still due; the others skip. Every
relay exports the last run's number of differences as `gateway_reconciliation_differences` (the
alert GatewayReconciliationDifferences fires on it). A run the gateway or the database cut short is
logged and tried again after RETRY_SECONDS; nothing is stored for it. After a stored run, the
orphan intents it found that nothing of ours will ever confirm (created for a payment whose
operation recorded another) are canceled at the gateway. Runs only with GATEWAY=stripe and a
non-zero interval.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import asyncpg

from outbox_relay.state import RelayState, error_text, wait_for
from payment_service.database import UNAVAILABLE_ERRORS, connect, try_advisory_lock
from payment_service.gateway.interface import Gateway, GatewayError
from payment_service.money import reconcile
from payment_service.money.reconcile import StoredReconciliation

logger = logging.getLogger(__name__)

RETRY_SECONDS = 300.0  # after a run the gateway or the database cut short
MAX_REST_SECONDS = 60.0  # the gauge follows another relay's runs at least this often


class Reconciler:
    def __init__(self, state: RelayState, gateway: Gateway) -> None:
        self.state = state
        self.gateway = gateway
        self.interval_seconds = state.settings.gateway_reconcile_interval
        self.attempts = 0  # passes tried (whether this relay ran them or another did)
        self.runs = 0  # passes this relay ran and stored
        self.canceled = 0  # orphan intents this relay canceled
        self._retry_at = 0.0  # monotonic: no pass before, after one cut short

    async def run(self) -> None:
        """A pass when one is due, until the relay stops."""
        stop = self.state.stop
        while not stop.is_set():
            rest = await self.attempt()
            await wait_for(stop, min(max(rest, 0.05), MAX_REST_SECONDS, self.interval_seconds))

    async def attempt(self) -> float:
        """Run a pass if one is due and no other relay is running one; seconds until the next
        is due."""
        self.attempts += 1
        try:
            async with self.state.connection() as conn:
                rest = self._rest(await reconcile.latest_reconciliation(conn))
            rest = max(rest, self._retry_at - time.monotonic())
            if rest > 0:
                return rest
            # Due: on a connection of its own, held while the gateway is listed (one an hour,
            # outside the relay's small pool), whose session holds the lock.
            conn = await connect(self.state.settings.dsn())
            try:
                if not await try_advisory_lock(conn, reconcile.RECONCILE_LOCK_ID):
                    return MAX_REST_SECONDS  # another relay is running it
                latest = await reconcile.latest_reconciliation(conn)
                rest = self._rest(latest)  # that relay may have finished it meanwhile
                if rest > 0:
                    return rest
                stored = await self._pass(conn, latest, datetime.now(UTC))
            finally:
                await conn.close()  # the lock goes with the session
        except GatewayError as error:
            logger.warning(
                "scheduled reconciliation cut short: the gateway did not answer; trying again",
                extra={"error": str(error), "retry_seconds": RETRY_SECONDS},
            )
            return self._retry_later()
        except UNAVAILABLE_ERRORS as error:
            logger.warning(
                "scheduled reconciliation cut short: the database is unavailable; trying again",
                extra={"error": error_text(error), "retry_seconds": RETRY_SECONDS},
            )
            return self._retry_later()
        self._show(stored)
        return self.interval_seconds

    def _retry_later(self) -> float:
        self._retry_at = time.monotonic() + RETRY_SECONDS
        return RETRY_SECONDS

    def _rest(self, latest: StoredReconciliation | None) -> float:
        """Show the last run's count; seconds until the next run is due."""
        self._show(latest)
        return reconcile.seconds_until_due(
            latest, now=datetime.now(UTC), interval_seconds=self.interval_seconds
        )

    async def _pass(
        self, conn: asyncpg.Connection, latest: StoredReconciliation | None, now: datetime
    ) -> StoredReconciliation:
        since, until = reconcile.next_window(
            latest, now=now, interval_seconds=self.interval_seconds
        )
        # Also what was decided since the window's start, whenever it was staged: a payment still
        # PENDING at the last run (a note) and decided since (the review queue) is compared now.
        result = await reconcile.reconcile(
            conn, self.gateway, since=since, until=until, decided_since=since
        )
        stored = await reconcile.insert_reconciliation(
            conn,
            result,
            started_at=now,
            finished_at=datetime.now(UTC),
        )
        self.runs += 1
        await self._cancel_abandoned(result)
        log = logger.warning if stored.differences else logger.info
        log(
            "scheduled reconciliation with the gateway",
            extra={
                "since": since.isoformat(),
                "until": until.isoformat(),
                "differences": stored.differences,
                "kinds": sorted({f.kind.value for f in result.differences}),
                "payments": result.payments,
                "refunds": result.refunds,
            },
        )
        return stored

    async def _cancel_abandoned(self, result: reconcile.Reconciliation) -> None:
        """Cancel the orphan intents nothing of ours will confirm, so that nobody can later (one
        the gateway will not cancel is logged and left: it stays a note of every run)."""
        for orphan in result.abandoned:
            assert orphan.intent_id is not None and orphan.payment_id is not None
            try:
                await self.gateway.cancel(orphan.intent_id, payment_id=orphan.payment_id)
            except GatewayError as error:
                logger.warning(
                    "an orphan intent could not be canceled",
                    extra={"intent_id": orphan.intent_id, "error": str(error)},
                )
                continue
            self.canceled += 1
            logger.info(
                "canceled an orphan intent (never confirmed; its payment has another)",
                extra={"intent_id": orphan.intent_id, "payment_id": orphan.payment_id},
            )

    def _show(self, latest: StoredReconciliation | None) -> None:
        if latest is not None:
            self.state.metrics.gateway_reconciliation_differences.set(latest.differences)
