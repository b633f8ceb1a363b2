"""The recorder: writes finished attempts, releases and lost claims back to the database.

Workers hand it each result (`record`) or a delivery they did not send (`release`); the claimer
hands it the token of a claim whose answer was lost (`claim_lost`). It writes whatever
accumulated while its last write ran, one statement per batch, checking each row's claim token;
when the database refuses a batch's values it writes the batch row by row, so one bad row never
holds back the others. A write that fails is retried after a delay: a result is only lost if its
lease runs out. The attempts written feed each endpoint's health (`record_health`).
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
    """The results not written yet, and the loop (`run`) that writes them."""

    def __init__(self, state: RelayState) -> None:
        self.state = state
        self._health_policy = HealthPolicy.from_settings(state.settings)
        self.records: list[AttemptRecord] = []
        self.releases: list[tuple[int, uuid.UUID]] = []
        # Tokens of claims whose answer was lost: their leases are ended once the database answers.
        self.lost_claims: list[uuid.UUID] = []
        self.results_ready = asyncio.Event()
        self._closing = False
        self.outcomes: Counter[str] = Counter()  # for the exit log line

    @property
    def unwritten(self) -> int:
        return len(self.records) + len(self.releases)

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
        self.records.append(record)
        self._finished(lane)

    def release(self, lane: Lane, event: ClaimedEvent) -> None:
        self.outcomes["RELEASED"] += 1
        self.state.metrics.released.inc()
        self.state.metrics.endpoint_deliveries.labels(lane.name, "released").inc()
        self.releases.append((event.id, event.claim_token))
        self._finished(lane)

    def release_unqueued(self, event: ClaimedEvent) -> None:
        """A delivery claimed for a lane retired while the claim ran: back in line."""
        self.releases.append((event.id, event.claim_token))
        self.results_ready.set()

    def claim_lost(self, token: uuid.UUID) -> None:
        """A claim whose answer was lost may have committed: its leases are ended once the
        database answers, rather than left to run out."""
        self.lost_claims.append(token)
        self.results_ready.set()

    def _finished(self, lane: Lane) -> None:
        self.results_ready.set()
        lane.held -= 1
        if lane.held == lane.low_water:  # room again: the claimer may serve this lane
            self.state.wake.set()

    def close(self) -> None:
        """Write what is left, then return from `run`."""
        self._closing = True
        self.results_ready.set()

    # -- writing ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Write finished attempts in batches: whatever accumulated while the last write ran."""
        delay = RETRY_DELAY_SECONDS
        while True:
            await self.results_ready.wait()
            self.results_ready.clear()
            if not self.records and not self.releases and not self.lost_claims:
                if self._closing:
                    return
                continue
            try:
                await self.write_results()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Keep the results and try again: a result is only lost if the lease runs out.
                logger.warning(
                    "could not write delivery results; retrying",
                    extra={"error": error_text(error), "retry_in_seconds": delay},
                    exc_info=not isinstance(error, UNAVAILABLE_ERRORS),
                )
                self.results_ready.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_SECONDS)
            else:
                delay = RETRY_DELAY_SECONDS

    async def write_results(self) -> None:
        wake = self.state.wake
        async with self.state.connection() as conn:
            if self.lost_claims:
                tokens = list(self.lost_claims)
                released = await outbox.release_claim_tokens(conn, tokens)
                del self.lost_claims[: len(tokens)]
                if released:
                    logger.info(
                        "released the leases of a claim whose answer was lost",
                        extra={"deliveries": released},
                    )
                wake.set()
            if self.records:
                batch, self.records = self.records, []
                written, dropped = await self._record_attempts(conn, batch)
                lost = len(batch) - len(written) - dropped
                if lost:
                    # An earlier try of this batch may have been written with its answer lost
                    # (the connection broke after the commit): those rows are ours, not lost.
                    done = {row.id for row in written}
                    mine = await outbox.recorded_already(
                        conn, [r for r in batch if r.id not in done]
                    )
                    lost -= len(mine)
                    if mine:
                        wake.set()  # a later delivery of the payment may be due now
                if lost:
                    self.state.metrics.lost_leases.inc(lost)
                    logger.warning(
                        "lease ran out before the result was written; another relay owns it",
                        extra={"deliveries": lost},
                    )
                if any(row.unblocks for row in written):
                    wake.set()
                await self._attempts_recorded(conn, _by_endpoint(batch, written))
            if self.releases:
                claims, self.releases = self.releases, []
                try:
                    await outbox.release_claims(conn, claims)
                except BaseException:
                    self.releases[:0] = claims
                    raise
                wake.set()

    async def _attempts_recorded(
        self, conn: asyncpg.Connection, attempts: dict[int, list[AttemptRecord]]
    ) -> None:
        """Called with the attempts just written, by endpoint id, in the order they finished:
        each endpoint's verdicts (one per attempt, quick retries counted once) feed its breaker
        and state (`record_health`). The attempts are written already, so a failure here is
        logged and the verdicts are lost, never the deliveries' results."""
        for endpoint_id, records in attempts.items():
            try:
                await record_health(
                    conn,
                    endpoint_id,
                    [recorded_verdict(r.status, r.status_code) for r in records],
                    policy=self._health_policy,
                    state_changes=self.state.metrics.endpoint_state_changes,
                )
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning(
                    "could not record the endpoint's health",
                    extra={"endpoint_id": endpoint_id, "error": error_text(error)},
                    exc_info=not isinstance(error, UNAVAILABLE_ERRORS),
                )

    async def _record_attempts(
        self, conn: asyncpg.Connection, batch: list[AttemptRecord]
    ) -> tuple[list[Written], int]:
        """Write a batch; if the database refuses its values, write it row by row.

        Returns the rows written and how many were dropped. Whatever was not written when the
        database turns out to be unreachable goes back on the list, to be written later.
        """
        try:
            return await outbox.record_attempts(conn, batch), 0
        except _REFUSED_VALUES as error:
            logger.error(
                "the database refused a batch of delivery results; writing them one by one",
                extra={"error": error_text(error), "results": len(batch)},
            )
        except BaseException:
            self.records[:0] = batch
            raise
        written: list[Written] = []
        dropped = 0
        for index, record in enumerate(batch):
            try:
                row = await self._record_attempt(conn, record)
            except BaseException:
                self.records[:0] = batch[index:]
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


def _by_endpoint(
    batch: list[AttemptRecord], written: list[Written]
) -> dict[int, list[AttemptRecord]]:
    """The written records of a batch, grouped by their delivery's endpoint."""
    records = {record.id: record for record in batch}
    grouped: dict[int, list[AttemptRecord]] = {}
    for row in written:
        grouped.setdefault(row.endpoint_id, []).append(records[row.id])
    return grouped


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
    """The result with only values the database always takes: same outcome, no receiver details."""
    return AttemptRecord(
        id=record.id,
        claim_token=record.claim_token,
        status=record.status,
        delay=record.delay if 0 <= record.delay <= MAX_RETRY_AFTER_SECONDS else retry_in,
        attempted_at=time.time(),
        status_code=None,
        error=f"the database refused this attempt's details ({type(refused).__name__})",
        tries=min(max(record.tries, 1), MAX_TRIES),
        duration_ms=min(max(record.duration_ms, 0), MAX_DURATION_MS),
        counted=record.counted,
        signed_with=record.signed_with,  # fingerprints: hex the database always takes
    )
