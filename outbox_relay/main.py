"""The relay process: lease due outbox events, deliver them, write the results back (DESIGN §7).

One relay runs these tasks on one event loop:
- the claimer leases batches of due events (`FOR UPDATE SKIP LOCKED`, one short statement) when
  woken by a NOTIFY, by the poll timer, by a delivery that unblocks a payment's next event, or by
  free capacity, and queues them;
- RELAY_CONCURRENCY workers take events off the queue and deliver them over one shared HTTP client;
- the recorder writes finished attempts back in batches, one statement per batch, checking each
  row's claim token (row by row when the database refuses a batch's values: one bad row never
  holds back the others);
- the listener LISTENs on the outbox channel and reconnects after a database restart;
- housekeeping and the metric gauges run on timers.
A loop that fails is logged and restarted after a delay. SIGTERM/SIGINT stop the claimer, let
in-flight deliveries finish within RELAY_SHUTDOWN_GRACE_SECONDS, release the rest, and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from outbox_relay import outbox
from outbox_relay.delivery import Deliverer
from outbox_relay.housekeeping import housekeep
from outbox_relay.http import CallbackClient
from outbox_relay.metrics import RelayMetrics
from outbox_relay.outbox import AttemptRecord, ClaimedEvent
from outbox_relay.schedule import MAX_RETRY_AFTER_SECONDS, Outcome, Verdict, decide
from payment_service import OUTBOX_CHANNEL, __version__
from payment_service.config import Settings
from payment_service.database import UNAVAILABLE_ERRORS, connect, create_pool
from payment_service.signing import secret_key

logger = logging.getLogger(__name__)

POOL_SIZE = 4  # claimer, recorder, housekeeping, gauges
RESTART_DELAY_SECONDS = 0.5  # first wait before a failed loop restarts; doubles up to the max
MAX_RESTART_DELAY_SECONDS = 5.0
HEALTHY_RUN_SECONDS = 30.0  # a loop that ran this long before failing restarts with the first delay
LISTENER_CHECK_SECONDS = 5.0  # how often an idle LISTEN connection is checked with SELECT 1
GAUGE_INTERVAL_SECONDS = 5.0
FINAL_WRITE_SECONDS = 1.0  # part of the shutdown grace kept for writing the last results
CLOSE_TIMEOUT_SECONDS = 2.0


class ListenerLost(Exception):
    """The LISTEN connection to the database was lost."""


# Failures a loop waits out and logs as a warning: the database is away (restart, failover).
_WAITED_OUT: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, ListenerLost)


class Relay:
    """One relay process's state and tasks; `run()` returns the exit code."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = RelayMetrics()
        # Events held (queued or in flight) are capped at one batch beyond the workers, and the
        # claimer claims again once no more than `concurrency` are held: claims stay batched
        # while the queue never runs dry under load.
        self._low_water = settings.relay_concurrency
        self._max_held = settings.relay_concurrency + settings.relay_batch_size
        # An event still queued this close to the end of its lease is released, not sent: another
        # relay may be about to take it over.
        self._lease_margin = min(settings.relay_request_timeout, settings.relay_lease_seconds / 2)
        self._held = 0
        self._queue: asyncio.Queue[tuple[ClaimedEvent, float] | None] = asyncio.Queue()
        self._records: list[AttemptRecord] = []
        self._releases: list[tuple[int, uuid.UUID]] = []
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # something may be claimable
        self._room = asyncio.Event()  # held events dropped to the low water mark
        self._results_ready = asyncio.Event()
        self._recorder_closing = False
        self._outcomes: Counter[str] = Counter()  # for the exit log line
        self._pool: asyncpg.Pool | None = None
        self._deliverer: Deliverer | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def stop(self) -> None:
        if not self._stop.is_set():
            logger.info("stop requested; draining in-flight deliveries")
        self._stop.set()
        self._wake.set()
        self._room.set()

    async def run(self) -> int:
        settings = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        metrics_server = (
            self.metrics.serve(settings.relay_metrics_host, settings.relay_metrics_port)
            if settings.relay_metrics_port
            else None
        )
        if settings.callback_signing_secret is None:
            logger.warning("CALLBACK_SIGNING_SECRET is not set: callbacks are sent unsigned")
        # min_size 0: the pool opens connections when asked, so the relay starts (and waits)
        # while the database is down.
        self._pool = await create_pool(settings.dsn(), min_size=0, max_size=POOL_SIZE)
        client = CallbackClient(
            settings.notification_url,
            max_connections=settings.relay_concurrency,
            timeout=settings.relay_request_timeout,
            user_agent=f"payment-service-relay/{__version__}",
        )
        self._deliverer = Deliverer(
            client,
            signing_key=(
                secret_key(settings.callback_signing_secret)
                if settings.callback_signing_secret
                else None
            ),
            request_timeout=settings.relay_request_timeout,
            quick_retries=settings.relay_quick_retries,
            quick_retry_wait=settings.relay_quick_retry_wait,
            max_attempts=settings.relay_max_attempts,
            schedule=settings.relay_retry_schedule,
            stopping=self._stop.is_set,
        )
        logger.info(
            "relay started",
            extra={
                "version": __version__,
                "url": _without_credentials(settings.notification_url),
                "concurrency": settings.relay_concurrency,
                "batch_size": settings.relay_batch_size,
                "lease_seconds": settings.relay_lease_seconds,
                "signed": settings.callback_signing_secret is not None,
            },
        )
        claimer = asyncio.create_task(self._supervise("claimer", self._claim_loop))
        workers = [asyncio.create_task(self._worker()) for _ in range(settings.relay_concurrency)]
        recorder = asyncio.create_task(self._record_loop())
        background = [
            asyncio.create_task(self._supervise("listener", self._listen_loop)),
            asyncio.create_task(self._supervise("housekeeping", self._housekeeping_loop)),
        ]
        if metrics_server is not None:
            background.append(asyncio.create_task(self._supervise("gauges", self._gauge_loop)))
        try:
            await self._stop.wait()
            await self._drain(claimer, workers, recorder)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await client.aclose()
            await self._close_pool()
            if metrics_server is not None:
                self.metrics.shutdown(metrics_server)
        logger.info("relay stopped", extra={"outcomes": dict(self._outcomes)})
        return 0

    async def _drain(
        self,
        claimer: asyncio.Task[None],
        workers: list[asyncio.Task[None]],
        recorder: asyncio.Task[None],
    ) -> None:
        """Stop claiming, let in-flight deliveries finish in the grace period, release the rest."""
        started = time.monotonic()
        grace = self.settings.relay_shutdown_grace_seconds
        deadline = started + grace
        drain_deadline = deadline - min(FINAL_WRITE_SECONDS, grace / 4)
        await _finish_within(claimer, deadline=drain_deadline)
        while not self._queue.empty():  # claimed but not started: back in line at once
            item = self._queue.get_nowait()
            if item is not None:
                self._release(item[0])
        for _ in workers:
            self._queue.put_nowait(None)
        await _finish_within(*workers, deadline=drain_deadline)
        self._recorder_closing = True
        self._results_ready.set()
        await _finish_within(recorder, deadline=max(deadline, time.monotonic() + 0.2))
        unwritten = len(self._records) + len(self._releases)
        if unwritten:
            logger.warning(
                "could not write every result before exiting; those leases run out instead",
                extra={"unwritten": unwritten},
            )
        logger.info(
            "drained", extra={"seconds": round(time.monotonic() - started, 3), "grace": grace}
        )

    async def _close_pool(self) -> None:
        if self._pool is None:
            return
        try:
            await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT_SECONDS)
        except UNAVAILABLE_ERRORS:  # includes the timeout
            self._pool.terminate()

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run a loop until stop; when it fails, log it and start it again after a delay."""
        delay = RESTART_DELAY_SECONDS
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except _WAITED_OUT as error:
                logger.warning(
                    "database unavailable; loop restarts after a delay",
                    extra={"loop": name, "error": _error_text(error), "retry_in_seconds": delay},
                )
            except Exception:
                logger.exception(
                    "relay loop crashed; it restarts after a delay",
                    extra={"loop": name, "retry_in_seconds": delay},
                )
            else:
                continue
            self.metrics.loop_restarts.labels(name).inc()
            await self._pause(delay)
            # Back off while failures come one after another; start afresh after a good run.
            ran_well = time.monotonic() - started > HEALTHY_RUN_SECONDS
            delay = RESTART_DELAY_SECONDS if ran_well else min(delay * 2, MAX_RESTART_DELAY_SECONDS)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on stop."""
        await _wait_for(self._stop, seconds)

    # -- claiming -----------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        assert self._pool is not None
        settings = self.settings
        while not self._stop.is_set():
            if self._held > self._low_water:
                self._room.clear()
                if self._held > self._low_water:
                    await self._room.wait()
                continue
            self._wake.clear()
            wanted = min(settings.relay_batch_size, self._max_held - self._held)
            lease_deadline = time.monotonic() + settings.relay_lease_seconds
            async with self._pool.acquire() as conn:
                events = await outbox.claim_events(
                    conn, limit=wanted, lease_seconds=settings.relay_lease_seconds
                )
            if events:
                self._held += len(events)
                self.metrics.claimed.inc(len(events))
                for event in events:
                    self._queue.put_nowait((event, lease_deadline))
            if len(events) < wanted:  # caught up: wait for news or the next poll
                await _wait_for(self._wake, settings.relay_poll_interval)

    def _on_notification(self, *_args: Any) -> None:
        self._wake.set()

    async def _listen_loop(self) -> None:
        conn = await connect(self.settings.dsn())
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(OUTBOX_CHANNEL, self._on_notification)
            logger.info("listening for new events", extra={"channel": OUTBOX_CHANNEL})
            self._wake.set()  # catch up with whatever was committed while not listening
            while True:
                await _wait_for(lost, LISTENER_CHECK_SECONDS)
                if lost.is_set() or conn.is_closed():
                    raise ListenerLost("the LISTEN connection was closed")
                await conn.fetchval("SELECT 1", timeout=LISTENER_CHECK_SECONDS)
        finally:
            conn.terminate()

    # -- delivering ---------------------------------------------------------------------------
    async def _worker(self) -> None:
        assert self._deliverer is not None
        while True:
            item = await self._queue.get()
            if item is None:
                return
            event, lease_deadline = item
            if time.monotonic() + self._lease_margin > lease_deadline:
                self._release(event)
                continue
            self.metrics.in_flight.inc()
            try:
                record = await self._deliverer.deliver(event, lease_deadline=lease_deadline)
            except asyncio.CancelledError:
                self._release(event)
                raise
            except Exception as error:  # a bug, not a receiver's failure: count it as one
                logger.exception("delivery raised", extra={"event_id": event.event_id})
                record = self._failed_record(event, f"relay error: {_error_text(error)}")
            finally:
                self.metrics.in_flight.dec()
            self._record(record, event)

    def _failed_record(self, event: ClaimedEvent, error: str) -> AttemptRecord:
        settings = self.settings
        outcome, delay = decide(
            Verdict.FAILED,
            attempts=event.attempts + 1,
            max_attempts=settings.relay_max_attempts,
            schedule=settings.relay_retry_schedule,
        )
        return AttemptRecord(
            id=event.id,
            claim_token=event.claim_token,
            status=outcome.value,
            delay=delay,
            attempted_at=time.time(),
            status_code=None,
            error=error,
            tries=1,
            duration_ms=0,
        )

    def _record(self, record: AttemptRecord, event: ClaimedEvent) -> None:
        metrics = self.metrics
        self._outcomes[record.status] += 1
        metrics.delivery_seconds.observe(record.duration_ms / 1000)
        if record.status == Outcome.DELIVERED.value:
            metrics.delivered.inc()
            metrics.event_lag_seconds.observe(max(time.time() - event.created_at, 0.0))
        elif record.status == Outcome.DEAD.value:
            metrics.dead.inc()
        else:
            metrics.rescheduled.inc()
        self._records.append(record)
        self._finished()

    def _release(self, event: ClaimedEvent) -> None:
        self._outcomes["RELEASED"] += 1
        self.metrics.released.inc()
        self._releases.append((event.id, event.claim_token))
        self._finished()

    def _finished(self) -> None:
        self._results_ready.set()
        self._held -= 1
        if self._held <= self._low_water:
            self._room.set()

    # -- recording ----------------------------------------------------------------------------
    async def _record_loop(self) -> None:
        """Write finished attempts in batches: whatever accumulated while the last write ran."""
        delay = RESTART_DELAY_SECONDS
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            if not self._records and not self._releases:
                if self._recorder_closing:
                    return
                continue
            try:
                await self._write_results()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Keep the results and try again: a result is only lost if the lease runs out.
                logger.warning(
                    "could not write delivery results; retrying",
                    extra={"error": _error_text(error), "retry_in_seconds": delay},
                    exc_info=not isinstance(error, UNAVAILABLE_ERRORS),
                )
                self._results_ready.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RESTART_DELAY_SECONDS)
            else:
                delay = RESTART_DELAY_SECONDS

    async def _write_results(self) -> None:
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            if self._records:
                batch, self._records = self._records, []
                written, dropped = await self._record_attempts(conn, batch)
                lost = len(batch) - len(written) - dropped
                if lost:
                    self.metrics.lost_leases.inc(lost)
                    logger.warning(
                        "lease ran out before the result was written; another relay owns it",
                        extra={"events": lost},
                    )
                if any(unblocks for _id, unblocks in written):
                    self._wake.set()
            if self._releases:
                claims, self._releases = self._releases, []
                try:
                    await outbox.release_claims(conn, claims)
                except BaseException:
                    self._releases[:0] = claims
                    raise
                self._wake.set()

    async def _record_attempts(
        self, conn: asyncpg.Connection, batch: list[AttemptRecord]
    ) -> tuple[list[tuple[int, bool]], int]:
        """Write a batch; if the database refuses its values, write it row by row.

        Returns the rows written and how many were dropped. Whatever was not written when the
        database turns out to be unreachable goes back on the list, to be written later.
        """
        try:
            return await outbox.record_attempts(conn, batch), 0
        except _REFUSED_VALUES as error:
            logger.error(
                "the database refused a batch of delivery results; writing them one by one",
                extra={"error": _error_text(error), "results": len(batch)},
            )
        except BaseException:
            self._records[:0] = batch
            raise
        written: list[tuple[int, bool]] = []
        dropped = 0
        for index, record in enumerate(batch):
            try:
                row = await self._record_attempt(conn, record)
            except BaseException:
                self._records[:0] = batch[index:]
                raise
            if row is None:
                dropped += 1
            else:
                written += row
        return written, dropped

    async def _record_attempt(
        self, conn: asyncpg.Connection, record: AttemptRecord
    ) -> list[tuple[int, bool]] | None:
        """Write one result; one the database refuses is written bare, or dropped (None)."""
        try:
            return await outbox.record_attempts(conn, [record])
        except _REFUSED_VALUES as error:
            refused = error
        bare = _bare(record, refused, retry_in=self.settings.relay_retry_schedule[0])
        try:
            written = await outbox.record_attempts(conn, [bare])
        except _REFUSED_VALUES as error:
            # Not retried: its lease runs out and the event goes out again.
            logger.error(
                "the database refused a delivery result; dropped",
                extra={"id": record.id, "error": _error_text(error)},
            )
            return None
        logger.error(
            "the database refused a delivery result; recorded without its details",
            extra={"id": record.id, "status": record.status, "error": _error_text(refused)},
        )
        return written

    # -- timers -------------------------------------------------------------------------------
    async def _housekeeping_loop(self) -> None:
        assert self._pool is not None
        while True:
            async with self._pool.acquire() as conn:
                await housekeep(conn, retention_hours=self.settings.outbox_retention_hours)
            await asyncio.sleep(self.settings.relay_housekeeping_interval)

    async def _gauge_loop(self) -> None:
        assert self._pool is not None
        while True:
            async with self._pool.acquire() as conn:
                backlog = await outbox.select_backlog(conn)
            self.metrics.pending.set(backlog["pending"])
            self.metrics.oldest_pending_age.set(backlog["oldest_pending_age_seconds"] or 0)
            self.metrics.dead_events.set(backlog["dead"])
            await asyncio.sleep(GAUGE_INTERVAL_SECONDS)


async def _wait_for(event: asyncio.Event, timeout: float) -> None:
    """Wait until `event` is set or `timeout` seconds pass, whichever comes first."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


async def _finish_within(*tasks: asyncio.Task[None], deadline: float) -> None:
    """Wait for tasks until a monotonic deadline, then cancel what is left."""
    _done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0))
    for task in pending:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            logger.error("task failed during shutdown", exc_info=result)


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
    )


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def run_relay(settings: Settings) -> int:
    """`payment-service relay`: run until SIGTERM/SIGINT; the exit code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed where it exists
        return asyncio.run(Relay(settings).run())
    return uvloop.run(Relay(settings).run())
