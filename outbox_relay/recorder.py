"""The recorder: writes finished attempts, releases and lost claims back to the database, each
lane on its own (`run(lane)`, on the lane's own connections).

Workers hand it each result (`record`) or a delivery they did not send (`release`); the claimer
hands it the token of a claim whose answer was lost (`claim_lost`). Each lane's loop writes
whatever accumulated for that lane while its last write ran, one statement per batch, checking
each row's claim token; when the database refuses a batch's values it writes the batch row by row,
so one bad row never holds back the others. A write that fails is retried after a delay: a result
is only lost if its lease runs out. The attempts written feed the lane's endpoint's health
(`record_health`). One endpoint's slow or failing writes never hold back another's: each lane
writes its own results, on its own pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter

import asyncpg

from outbox_relay import outbox
from outbox_relay.endpoint_health import record_health, recorded_verdict
from outbox_relay.health import HealthPolicy
from outbox_relay.lanes import Lane
from outbox_relay.outbox import AttemptRecord, ClaimedEvent, Written
from outbox_relay.schedule import MAX_RETRY_AFTER_SECONDS, Outcome
from outbox_relay.state import RelayState, error_text
from payment_service.database import UNAVAILABLE_ERRORS

logger = logging.getLogger(__name__)

RETRY_DELAY_SECONDS = 0.5  # first wait before a failed write is tried again; doubles up to the max
MAX_RETRY_DELAY_SECONDS = 5.0


class Recorder:
    """Takes the lanes' results, and runs each lane's loop (`run`) that writes them."""

    def __init__(self, state: RelayState) -> None:
        self.state = state
        self._health_policy = HealthPolicy.from_settings(state.settings)
        self.outcomes: Counter[str] = Counter()  # for the exit log line

    # -- handed in by the workers and the claimer ---------------------------------------------
    def record(self, lane: Lane, record: AttemptRecord, event: ClaimedEvent) -> None:
        metrics = self.state.metrics
        self.outcomes[record.status] += 1
        metrics.delivery_seconds.observe(record.duration_ms / 1000)
        if record.status == Outcome.DELIVERED.value:
            metrics.delivered.inc()
            metrics.event_lag_seconds.observe(max(time.time() - event.created_at, 0.0))
            outcome = "delivered"
        elif record.status == Outcome.DEAD.value:
            metrics.dead.inc()
            outcome = "dead"
        else:
            metrics.rescheduled.inc()
            outcome = "rescheduled"
        metrics.endpoint_deliveries.labels(lane.name, outcome).inc()
        lane.unwritten.records.append(record)
        lane.unwritten.ready.set()

    def release(self, lane: Lane, event: ClaimedEvent) -> None:
        """A claimed delivery not sent (stopping, retired, too late in its lease): back in line."""
        self.outcomes["RELEASED"] += 1
        self.state.metrics.released.inc()
        self.state.metrics.endpoint_deliveries.labels(lane.name, "released").inc()
        lane.unwritten.releases.append((event.id, event.claim_token))
        lane.unwritten.ready.set()

    def claim_lost(self, lane: Lane, token: uuid.UUID) -> None:
        """A claim whose answer was lost may have committed: its leases are ended once the
        database answers, rather than left to run out."""
        lane.unwritten.lost_claims.append(token)
        lane.unwritten.ready.set()

    def close(self, lane: Lane) -> None:
        """Write what is left of the lane's, then return from `run`."""
        lane.unwritten.closing = True
        lane.unwritten.ready.set()

    # -- writing ------------------------------------------------------------------------------
    async def run(self, lane: Lane) -> None:
        """Write the lane's finished attempts in batches: whatever accumulated while the last
        write ran."""
        todo = lane.unwritten
        delay = RETRY_DELAY_SECONDS
        while True:
            await todo.ready.wait()
            todo.ready.clear()
            if not todo:
                if todo.closing:
                    return
                continue
            try:
                await self.write_results(lane)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Keep the results and try again: a result is only lost if the lease runs out.
                logger.warning(
                    "could not write delivery results; retrying",
                    extra={
                        "endpoint": lane.name,
                        "error": error_text(error),
                        "retry_in_seconds": delay,
                    },
                    exc_info=not isinstance(error, UNAVAILABLE_ERRORS),
                )
                todo.ready.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_SECONDS)
            else:
                delay = RETRY_DELAY_SECONDS

    async def write_results(self, lane: Lane) -> None:
        todo = lane.unwritten
        written: list[Written] = []
        batch: list[AttemptRecord] = []
        async with lane.connection() as conn:
            if todo.lost_claims:
                tokens = list(todo.lost_claims)
                released = await outbox.release_claim_tokens(conn, tokens)
                del todo.lost_claims[: len(tokens)]
                if released:
                    logger.info(
                        "released the leases of a claim whose answer was lost",
                        extra={"endpoint": lane.name, "deliveries": released},
                    )
                lane.wake.set()
            if todo.records:
                batch, todo.records = todo.records, []
                written = await self._write_batch(lane, conn, batch)
            if todo.releases:
                claims, todo.releases = todo.releases, []
                try:
                    await outbox.release_claims(conn, claims)
                except BaseException:
                    todo.releases[:0] = claims
                    raise
                lane.wake.set()
        if written:
            await self._record_health(lane, batch, written)

    async def _write_batch(
        self, lane: Lane, conn: asyncpg.Connection, batch: list[AttemptRecord]
    ) -> list[Written]:
        """Write a batch of the lane's results; the rows written. Those not written are looked
        for: an earlier try of this batch written with its answer lost is ours, a row deleted
        meanwhile (its endpoint removed) is gone, any other was taken over by another relay."""
        written, dropped = await self._record_attempts(lane, conn, batch)
        unwritten = len(batch) - len(written) - dropped
        if unwritten:
            done = {row.id for row in written}
            fates = await outbox.recorded_already(conn, [r for r in batch if r.id not in done])
            if fates.mine:
                lane.wake.set()  # a later delivery of the payment may be due now
            if fates.gone:
                logger.info(
                    "deliveries deleted while in flight (their endpoint was removed); "
                    "their results are dropped",
                    extra={"endpoint": lane.name, "deliveries": len(fates.gone)},
                )
            lost = unwritten - len(fates.mine) - len(fates.gone)
            if lost:
                self.state.metrics.lost_leases.inc(lost)
                logger.warning(
                    "lease ran out before the result was written; another relay owns it",
                    extra={"endpoint": lane.name, "deliveries": lost},
                )
        if any(row.unblocks for row in written):
            lane.wake.set()
        return written

    async def _record_health(
        self, lane: Lane, batch: list[AttemptRecord], written: list[Written]
    ) -> None:
        """The attempts just written, in the order they finished, feed the endpoint's breaker and
        state (`record_health`; one verdict per attempt, quick retries counted once). On a
        connection of its own: a failure there is the pool's to judge (a server gone expires it),
        then logged here; the verdicts are lost, never the deliveries' results."""
        ids = {row.id for row in written}
        verdicts = [recorded_verdict(r.status, r.status_code) for r in batch if r.id in ids]
        try:
            async with lane.connection() as conn:
                await record_health(
                    conn,
                    lane.endpoint_id,
                    verdicts,
                    policy=self._health_policy,
                    state_changes=self.state.metrics.endpoint_state_changes,
                )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.warning(
                "could not record the endpoint's health",
                extra={"endpoint": lane.name, "error": error_text(error)},
                exc_info=not isinstance(error, UNAVAILABLE_ERRORS),
            )

    async def _record_attempts(
        self, lane: Lane, conn: asyncpg.Connection, batch: list[AttemptRecord]
    ) -> tuple[list[Written], int]:
        """Write a batch; if the database refuses its values, write it row by row.

        Returns the rows written and how many were dropped. Whatever was not written when the
        database turns out to be unreachable goes back on the list, to be written later.
        """
        todo = lane.unwritten
        try:
            return await outbox.record_attempts(conn, batch), 0
        except _REFUSED_VALUES as error:
            logger.error(
                "the database refused a batch of delivery results; writing them one by one",
                extra={"endpoint": lane.name, "error": error_text(error), "results": len(batch)},
            )
        except BaseException:
            todo.records[:0] = batch
            raise
        written: list[Written] = []
        dropped = 0
        for index, record in enumerate(batch):
            try:
                row = await self._record_attempt(conn, record)
            except BaseException:
                todo.records[:0] = batch[index:]
                raise
            if row is None:
                dropped += 1
            else:
                written += row
        return written, dropped

    async def _record_attempt(
        self, conn: asyncpg.Connection, record: AttemptRecord
    ) -> list[Written] | None:
        """Write one result; one the database refuses is written bare, or dropped (None)."""
        try:
            return await outbox.record_attempts(conn, [record])
        except _REFUSED_VALUES as error:
            refused = error
        bare = _bare(record, refused, retry_in=self.state.settings.relay_retry_schedule[0])
        try:
            written = await outbox.record_attempts(conn, [bare])
        except _REFUSED_VALUES as error:
            # Not retried: its lease runs out and the event goes out again.
            logger.error(
                "the database refused a delivery result; dropped",
                extra={"id": record.id, "error": error_text(error)},
            )
            return None
        logger.error(
            "the database refused a delivery result; recorded without its details",
            extra={"id": record.id, "status": record.status, "error": error_text(refused)},
        )
        return written


# The database (SQLSTATE classes 22 and 23) or the driver (encoding an argument: asyncpg raises a
# ValueError) refused the values of a write. Writing the same values again cannot succeed.
_REFUSED_VALUES: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    ValueError,
)
MAX_TRIES = 1000  # tries in one attempt, as written when a result's details were refused
MAX_DURATION_MS = 2**31 - 1


def _bare(record: AttemptRecord, refused: BaseException, *, retry_in: float) -> AttemptRecord:
    """The result with only values the database always takes: same outcome, no receiver details.
    It keeps the attempt's own time (as `storable_epoch` writes it), so that the bare record
    written again after a lost answer is recognised as this relay's (`recorded_already`)."""
    return AttemptRecord(
        id=record.id,
        claim_token=record.claim_token,
        status=record.status,
        delay=record.delay if 0 <= record.delay <= MAX_RETRY_AFTER_SECONDS else retry_in,
        attempted_at=outbox.storable_epoch(record.attempted_at),
        status_code=None,
        error=f"the database refused this attempt's details ({type(refused).__name__})",
        tries=min(max(record.tries, 1), MAX_TRIES),
        duration_ms=min(max(record.duration_ms, 0), MAX_DURATION_MS),
        counted=record.counted,
    )
