"""The relay process: lease due deliveries, send them, write the results back.

A delivery is one event on its way to one subscribed endpoint. One relay runs these tasks on one
event loop:
- the endpoint loop seeds the endpoints from the settings once at start (`seed_from_settings`:
  with only NOTIFICATION_SERVICE_URL the relay behaves as before subscriptions), then reloads the
  endpoints every second and at once when a change is NOTIFYed on ENDPOINTS_CHANNEL;
- each ACTIVE endpoint with a URL has a lane (outbox_relay.lanes): its own HTTP client, signing
  keys, queue and workers, and its share of RELAY_CONCURRENCY;
- the claimer leases due deliveries (`FOR UPDATE SKIP LOCKED`, one short statement) with a budget
  per lane, when woken by a NOTIFY, by the poll timer, by a delivery that unblocks the next one of
  a payment, or by a lane that has room again, and queues each on its lane;
- the recorder writes finished attempts back in batches, one statement per batch, checking each
  row's claim token (row by row when the database refuses a batch's values: one bad row never
  holds back the others);
- the listener LISTENs on the outbox and endpoint channels and reconnects after a database
  restart;
- housekeeping and the metric gauges run on timers.

Independence: an endpoint that is down, slow (answers after the timeout) or answers 500 must
never delay another's deliveries. Three things see to it:
1. in flight: a lane sends at most its share of RELAY_CONCURRENCY (ceil(concurrency / lanes), at
   least one) at once, with workers and a connection pool of its own, so a hanging endpoint holds
   its own workers and never anyone else's;
2. claiming: the claim statement takes a budget per endpoint (a LATERAL subquery each, read
   through the per-endpoint index), and a lane is only given room when it has drained to its low
   water mark, so one endpoint's backlog never fills a batch and a full lane never stops the
   claimer from serving the others;
3. order per (endpoint, payment) only: a delivery waits for an earlier PENDING delivery of the
   same payment to the same endpoint, never for another endpoint's.
Endpoint health (outbox_relay.health, outbox_relay.endpoint_health) is wired in two
places:
- claiming (`_claim_budget`, `_probe`): a lane whose endpoint's breaker is closed claims its
  budget; an open breaker claims nothing (its deliveries wait, keeping their attempts); a
  half-open one sends one probe across all relays (`lease_probe`), the earliest pending delivery
  due or not, whose attempt does not count toward RELAY_MAX_ATTEMPTS;
- recording (`_attempts_recorded`): each batch's written attempts go, per endpoint, to
  `record_health`, which opens, reopens or closes the breaker, and disables the endpoint on 410
  Gone (that delivery stays PENDING until `endpoints enable`) or after ENDPOINT_DISABLE_AFTER_HOURS
  of failure. Every change is logged and counted there, and NOTIFYed, so every relay reloads the
  endpoint at once; a relay also logs each change it sees in the endpoints it reloads.

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
from outbox_relay.endpoint_health import end_probe, lease_probe, record_health, recorded_verdict
from outbox_relay.health import HealthPolicy
from outbox_relay.housekeeping import housekeep
from outbox_relay.http import CallbackClient
from outbox_relay.lanes import Lane, claimable, signing_keys
from outbox_relay.metrics import EndpointGauges, RelayMetrics
from outbox_relay.outbox import AttemptRecord, ClaimedEvent, Written
from outbox_relay.schedule import MAX_RETRY_AFTER_SECONDS, Outcome, Verdict, decide
from payment_service import ENDPOINTS_CHANNEL, OUTBOX_CHANNEL, __version__
from payment_service.config import Settings
from payment_service.database import UNAVAILABLE_ERRORS, acquire, connect, create_pool
from payment_service.endpoints import Endpoint, seed_from_settings, select_endpoints

logger = logging.getLogger(__name__)

POOL_SIZE = 5  # claimer, recorder, endpoints, housekeeping, gauges
RESTART_DELAY_SECONDS = 0.5  # first wait before a failed loop restarts; doubles up to the max
MAX_RESTART_DELAY_SECONDS = 5.0
HEALTHY_RUN_SECONDS = 30.0  # a loop that ran this long before failing restarts with the first delay
LISTENER_CHECK_SECONDS = 5.0  # how often an idle LISTEN connection is checked with SELECT 1
GAUGE_INTERVAL_SECONDS = 5.0
ENDPOINT_RELOAD_SECONDS = 1.0  # endpoints are read again at least this often
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
        self._health_policy = HealthPolicy.from_settings(settings)
        # (state, breaker) of every endpoint as last read, to log the changes the relay sees
        self._endpoint_states: dict[int, tuple[str, str]] = {}
        # A delivery still queued this close to the end of its lease is released, not sent:
        # another relay may be about to take it over.
        self._lease_margin = min(settings.relay_request_timeout, settings.relay_lease_seconds / 2)
        self._lanes: dict[int, Lane] = {}  # by endpoint id: the endpoints delivered to now
        self._retiring: set[Lane] = set()  # lanes finishing their in-flight deliveries
        self._closers: set[asyncio.Task[None]] = set()
        self._endpoints_loaded = False
        self._seeded = False
        self._records: list[AttemptRecord] = []
        self._releases: list[tuple[int, uuid.UUID]] = []
        # Tokens of claims whose answer was lost: their leases are ended once the database answers.
        self._lost_claims: list[uuid.UUID] = []
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # something may be claimable, or a lane has room again
        self._endpoints_changed = asyncio.Event()
        self._results_ready = asyncio.Event()
        self._recorder_closing = False
        self._outcomes: Counter[str] = Counter()  # for the exit log line
        self._pool: asyncpg.Pool | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def stop(self) -> None:
        if not self._stop.is_set():
            logger.info("stop requested; draining in-flight deliveries")
        self._stop.set()
        self._wake.set()
        for lane in self._all_lanes():
            lane.slot_freed.set()

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
        # min_size 0: the pool opens connections when asked, so the relay starts (and waits)
        # while the database is down.
        self._pool = await create_pool(settings.dsn(), min_size=0, max_size=POOL_SIZE)
        logger.info(
            "relay started",
            extra={
                "version": __version__,
                "concurrency": settings.relay_concurrency,
                "batch_size": settings.relay_batch_size,
                "lease_seconds": settings.relay_lease_seconds,
            },
        )
        claimer = asyncio.create_task(self._supervise("claimer", self._claim_loop))
        recorder = asyncio.create_task(self._record_loop())
        background = [
            asyncio.create_task(self._supervise("endpoints", self._endpoint_loop)),
            asyncio.create_task(self._supervise("listener", self._listen_loop)),
            asyncio.create_task(self._supervise("housekeeping", self._housekeeping_loop)),
        ]
        if metrics_server is not None:
            background.append(asyncio.create_task(self._supervise("gauges", self._gauge_loop)))
        try:
            await self._stop.wait()
            await self._drain(claimer, recorder)
        finally:
            for task in [*background, *self._closers]:
                task.cancel()
            await asyncio.gather(*background, *self._closers, return_exceptions=True)
            for lane in self._all_lanes():
                await lane.client.aclose()
            await self._close_pool()
            if metrics_server is not None:
                self.metrics.shutdown(metrics_server)
        logger.info("relay stopped", extra={"outcomes": dict(self._outcomes)})
        return 0

    def _all_lanes(self) -> list[Lane]:
        return [*self._lanes.values(), *self._retiring]

    async def _drain(self, claimer: asyncio.Task[None], recorder: asyncio.Task[None]) -> None:
        """Stop claiming, let in-flight deliveries finish in the grace period, release the rest."""
        started = time.monotonic()
        grace = self.settings.relay_shutdown_grace_seconds
        deadline = started + grace
        drain_deadline = deadline - min(FINAL_WRITE_SECONDS, grace / 4)
        await _finish_within(claimer, deadline=drain_deadline)
        workers: list[asyncio.Task[None]] = []
        for lane in self._all_lanes():
            self._stop_workers(lane)  # claimed but not started: back in line at once
            workers += lane.workers
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

    # -- endpoints and lanes ------------------------------------------------------------------
    async def _endpoint_loop(self) -> None:
        """Seed once, then keep the lanes in step with the endpoints (every second, or at once
        on a NOTIFY)."""
        assert self._pool is not None
        while True:
            self._endpoints_changed.clear()
            async with acquire(self._pool, timeout=None) as conn:
                if not self._seeded:
                    seeded = await seed_from_settings(conn, self.settings)
                    self._seeded = True
                    if seeded:
                        logger.info("endpoints seeded from the settings", extra={"names": seeded})
                found = await select_endpoints(conn)
            self._apply_endpoints(found)
            await _wait_for(self._endpoints_changed, ENDPOINT_RELOAD_SECONDS)

    def _apply_endpoints(self, found: list[Endpoint]) -> None:
        """Open a lane for each endpoint now delivered to, retire the lanes of those that went
        (removed, paused, disabled, or given a new URL), refresh the others."""
        wanted = {e.endpoint_id: e for e in found if claimable(e)}
        breaker_changed = self._note_states(found)
        changed = False
        for endpoint_id, lane in list(self._lanes.items()):
            endpoint = wanted.get(endpoint_id)
            if endpoint is None or endpoint.url != lane.endpoint.url:
                self._retire(lane, endpoint)
                changed = True
        for endpoint_id, endpoint in wanted.items():
            if endpoint_id in self._lanes:
                self._lanes[endpoint_id].update(endpoint)
            else:
                self._lanes[endpoint_id] = self._open_lane(endpoint)
                changed = True
        if changed:
            for lane in self._lanes.values():
                lane.size(
                    concurrency=self.settings.relay_concurrency,
                    batch_size=self.settings.relay_batch_size,
                    lanes=len(self._lanes),
                )
        if changed or breaker_changed or not self._endpoints_loaded:
            self._endpoints_loaded = True
            self._wake.set()

    def _note_states(self, found: list[Endpoint]) -> bool:
        """Log every change of an endpoint's state or breaker since the last read (whoever made
        it: this relay, another, or an operator); True when a breaker changed (the claimer must
        look again: a half-open breaker may probe, a closed one claim)."""
        seen = {e.endpoint_id: (e.state, e.breaker) for e in found}
        breaker_changed = False
        for endpoint in found:
            before = self._endpoint_states.get(endpoint.endpoint_id)
            now = seen[endpoint.endpoint_id]
            if before is None or before == now:
                continue
            breaker_changed |= before[1] != now[1]
            logger.info(
                "endpoint health seen",
                extra={
                    "endpoint": endpoint.name,
                    "state": now[0],
                    "breaker": now[1],
                    "was": {"state": before[0], "breaker": before[1]},
                    "reason": endpoint.state_reason,
                },
            )
        self._endpoint_states = seen
        return breaker_changed

    def _open_lane(self, endpoint: Endpoint) -> Lane:
        settings = self.settings
        assert endpoint.url is not None
        client = CallbackClient(
            endpoint.url,
            max_connections=settings.relay_concurrency,
            timeout=settings.relay_request_timeout,
            user_agent=f"payment-service-relay/{__version__}",
        )
        deliverer = Deliverer(
            client,
            signing_keys=signing_keys(endpoint),
            request_timeout=settings.relay_request_timeout,
            quick_retries=settings.relay_quick_retries,
            quick_retry_wait=settings.relay_quick_retry_wait,
            max_attempts=settings.relay_max_attempts,
            schedule=settings.relay_retry_schedule,
            stopping=self._stop.is_set,
            endpoint=endpoint.name,
        )
        lane = Lane(endpoint, client, deliverer)
        # As many workers as the lane could ever be allowed; `lane.limit` bounds those sending.
        lane.workers = [
            asyncio.create_task(self._worker(lane)) for _ in range(settings.relay_concurrency)
        ]
        logger.info(
            "delivering to endpoint",
            extra={
                "endpoint": endpoint.name,
                "url": _without_credentials(endpoint.url),
                "event_types": list(endpoint.event_types),
                "signed": bool(endpoint.signing_secrets()),
            },
        )
        if not endpoint.signing_secrets():
            logger.warning(
                "endpoint has no signing secret: its callbacks are sent unsigned",
                extra={"endpoint": endpoint.name},
            )
        return lane

    def _retire(self, lane: Lane, now: Endpoint | None) -> None:
        """Stop delivering to a lane: release what it has not started, let the rest finish,
        then close its connections."""
        del self._lanes[lane.endpoint_id]
        lane.retired = True
        self._retiring.add(lane)
        self._stop_workers(lane)
        logger.info(
            "no longer delivering to endpoint",
            extra={
                "endpoint": lane.name,
                "state": None if now is None else now.state,
                "reason": "removed" if now is None else ("url changed" if now.url else "no url"),
            },
        )
        closer = asyncio.create_task(self._close_lane(lane))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    def _stop_workers(self, lane: Lane) -> None:
        """Release every delivery still queued on the lane and tell its workers to stop."""
        while not lane.queue.empty():
            item = lane.queue.get_nowait()
            if item is not None:
                self._release(lane, item[0])
        for _ in lane.workers:
            lane.queue.put_nowait(None)
        lane.slot_freed.set()

    async def _close_lane(self, lane: Lane) -> None:
        await asyncio.gather(*lane.workers, return_exceptions=True)
        await lane.client.aclose()
        self._retiring.discard(lane)

    def _claim_budget(self, lane: Lane) -> int:
        """How many deliveries to claim for the lane now: its budget while its endpoint's breaker
        is closed, nothing while it is open; a half-open breaker's one probe goes through
        `_probe` instead. (The claim statement checks the breaker too: a relay whose copy of the
        endpoint is a moment old never claims a batch for an open breaker.)"""
        if lane.endpoint.breaker != "closed":
            return 0
        return lane.budget(self.settings.relay_batch_size)

    async def _probe(self, conn: asyncpg.Connection, lane: Lane) -> ClaimedEvent | None:
        """A half-open breaker's probe: take the one probe lease every relay competes for, then
        the earliest pending delivery of the endpoint, due or not. None: no probe now (another
        relay's is in flight, the cooldown is not over, or nothing waits)."""
        settings = self.settings
        if lane.endpoint.breaker != "half_open" or lane.held or lane.retired:
            return None
        if not await lease_probe(
            conn,
            lane.endpoint_id,
            lease_seconds=settings.relay_lease_seconds,
            state_changes=self.metrics.endpoint_state_changes,
        ):
            return None
        token = uuid.uuid4()
        try:
            event = await outbox.claim_probe(
                conn, lane.endpoint_id, lease_seconds=settings.relay_lease_seconds, token=token
            )
        except BaseException:
            self._lost_claims.append(token)  # as for a claim (`_claim_loop`)
            self._results_ready.set()
            raise
        if event is None:
            await end_probe(conn, lane.endpoint_id)
        else:
            logger.info(
                "probing endpoint",
                extra={"endpoint": lane.name, "event_id": event.event_id},
            )
        return event

    # -- claiming -----------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        assert self._pool is not None
        settings = self.settings
        while not self._stop.is_set():
            self._wake.clear()
            budgets = {
                lane.endpoint_id: budget
                for lane in self._lanes.values()
                if (budget := self._claim_budget(lane)) > 0
            }
            probing = [
                lane for lane in self._lanes.values() if lane.endpoint.breaker == "half_open"
            ]
            if not budgets and not probing:  # no endpoint, or every lane full: wait
                await _wait_for(self._wake, settings.relay_poll_interval)
                continue
            lease_deadline = time.monotonic() + settings.relay_lease_seconds
            events: list[ClaimedEvent] = []
            async with acquire(self._pool, timeout=None) as conn:
                for half_open in probing:
                    if (probe := await self._probe(conn, half_open)) is not None:
                        events.append(probe)
                if budgets:
                    token = uuid.uuid4()
                    try:
                        events += await outbox.claim_deliveries(
                            conn,
                            budgets=budgets,
                            lease_seconds=settings.relay_lease_seconds,
                            token=token,
                        )
                    except BaseException:
                        # The claim may have committed (on failover: reached the standby) with
                        # its answer lost: release its leases rather than let them run out.
                        self._lost_claims.append(token)
                        self._results_ready.set()
                        raise
            claimed: Counter[int] = Counter()
            for event in events:
                claimed[event.endpoint_id] += 1
                lane = self._lanes.get(event.endpoint_id)
                if lane is None:  # retired while the claim ran: back in line
                    self._releases.append((event.id, event.claim_token))
                    self._results_ready.set()
                    continue
                lane.held += 1
                lane.queue.put_nowait((event, lease_deadline))
            self.metrics.claimed.inc(len(events))
            if all(claimed[endpoint_id] < n for endpoint_id, n in budgets.items()):
                # every endpoint caught up: wait for news or the next poll
                await _wait_for(self._wake, settings.relay_poll_interval)

    def _on_notification(self, *_args: Any) -> None:
        self._wake.set()

    def _on_endpoint_change(self, *_args: Any) -> None:
        self._endpoints_changed.set()

    async def _listen_loop(self) -> None:
        conn = await connect(self.settings.dsn())
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(OUTBOX_CHANNEL, self._on_notification)
            await conn.add_listener(ENDPOINTS_CHANNEL, self._on_endpoint_change)
            logger.info("listening for new events", extra={"channel": OUTBOX_CHANNEL})
            # catch up with whatever was committed or changed while not listening
            self._wake.set()
            self._endpoints_changed.set()
            while True:
                await _wait_for(lost, LISTENER_CHECK_SECONDS)
                if lost.is_set() or conn.is_closed():
                    raise ListenerLost("the LISTEN connection was closed")
                await conn.fetchval("SELECT 1", timeout=LISTENER_CHECK_SECONDS)
        finally:
            conn.terminate()

    # -- delivering ---------------------------------------------------------------------------
    async def _take_slot(self, lane: Lane) -> bool:
        """Wait until the lane may send one more; False when it must not (stop, retired)."""
        while lane.in_flight >= lane.limit:
            if self._stop.is_set() or lane.retired:
                return False
            lane.slot_freed.clear()
            await lane.slot_freed.wait()
        if self._stop.is_set() or lane.retired:
            return False
        lane.in_flight += 1
        return True

    async def _worker(self, lane: Lane) -> None:
        while True:
            item = await lane.queue.get()
            if item is None:
                return
            event, lease_deadline = item
            if not await self._take_slot(lane):
                self._release(lane, event)
                continue
            try:
                if time.monotonic() + self._lease_margin > lease_deadline:
                    self._release(lane, event)
                    continue
                self.metrics.in_flight.inc()
                try:
                    record = await lane.deliverer.deliver(event, lease_deadline=lease_deadline)
                except asyncio.CancelledError:
                    self._release(lane, event)
                    raise
                except Exception as error:  # a bug, not a receiver's failure: count it as one
                    logger.exception(
                        "delivery raised", extra={"event_id": event.event_id, "endpoint": lane.name}
                    )
                    record = self._failed_record(event, f"relay error: {_error_text(error)}")
                finally:
                    self.metrics.in_flight.dec()
            finally:
                lane.in_flight -= 1
                lane.slot_freed.set()
            self._record(lane, record, event)

    def _failed_record(self, event: ClaimedEvent, error: str) -> AttemptRecord:
        settings = self.settings
        outcome, delay = decide(
            Verdict.FAILED,
            attempts=event.attempts + int(event.counted),
            max_attempts=settings.relay_max_attempts,
            schedule=settings.relay_retry_schedule,
            counted=event.counted,
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
            counted=event.counted,
        )

    def _record(self, lane: Lane, record: AttemptRecord, event: ClaimedEvent) -> None:
        metrics = self.metrics
        self._outcomes[record.status] += 1
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
        self._records.append(record)
        self._finished(lane)

    def _release(self, lane: Lane, event: ClaimedEvent) -> None:
        self._outcomes["RELEASED"] += 1
        self.metrics.released.inc()
        self.metrics.endpoint_deliveries.labels(lane.name, "released").inc()
        self._releases.append((event.id, event.claim_token))
        self._finished(lane)

    def _finished(self, lane: Lane) -> None:
        self._results_ready.set()
        lane.held -= 1
        if lane.held == lane.low_water:  # room again: the claimer may serve this lane
            self._wake.set()

    # -- recording ----------------------------------------------------------------------------
    async def _record_loop(self) -> None:
        """Write finished attempts in batches: whatever accumulated while the last write ran."""
        delay = RESTART_DELAY_SECONDS
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            if not self._records and not self._releases and not self._lost_claims:
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
        async with acquire(self._pool, timeout=None) as conn:
            if self._lost_claims:
                tokens = list(self._lost_claims)
                released = await outbox.release_claim_tokens(conn, tokens)
                del self._lost_claims[: len(tokens)]
                if released:
                    logger.info(
                        "released the leases of a claim whose answer was lost",
                        extra={"deliveries": released},
                    )
                self._wake.set()
            if self._records:
                batch, self._records = self._records, []
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
                        self._wake.set()  # a later delivery of the payment may be due now
                if lost:
                    self.metrics.lost_leases.inc(lost)
                    logger.warning(
                        "lease ran out before the result was written; another relay owns it",
                        extra={"deliveries": lost},
                    )
                if any(row.unblocks for row in written):
                    self._wake.set()
                await self._attempts_recorded(conn, _by_endpoint(batch, written))
            if self._releases:
                claims, self._releases = self._releases, []
                try:
                    await outbox.release_claims(conn, claims)
                except BaseException:
                    self._releases[:0] = claims
                    raise
                self._wake.set()

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
                    state_changes=self.metrics.endpoint_state_changes,
                )
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning(
                    "could not record the endpoint's health",
                    extra={"endpoint_id": endpoint_id, "error": _error_text(error)},
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
                extra={"error": _error_text(error), "results": len(batch)},
            )
        except BaseException:
            self._records[:0] = batch
            raise
        written: list[Written] = []
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
    ) -> list[Written] | None:
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
            async with acquire(self._pool, timeout=None) as conn:
                await housekeep(conn, retention_hours=self.settings.outbox_retention_hours)
            await asyncio.sleep(self.settings.relay_housekeeping_interval)

    async def _gauge_loop(self) -> None:
        assert self._pool is not None
        while True:
            async with acquire(self._pool, timeout=None) as conn:
                rows = await outbox.select_endpoint_backlog(conn)
            self.metrics.set_backlog([EndpointGauges(**row) for row in rows])
            await asyncio.sleep(GAUGE_INTERVAL_SECONDS)


def _by_endpoint(
    batch: list[AttemptRecord], written: list[Written]
) -> dict[int, list[AttemptRecord]]:
    """The written records of a batch, grouped by their delivery's endpoint."""
    records = {record.id: record for record in batch}
    grouped: dict[int, list[AttemptRecord]] = {}
    for row in written:
        grouped.setdefault(row.endpoint_id, []).append(records[row.id])
    return grouped


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
        counted=record.counted,
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
