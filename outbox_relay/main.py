"""The relay process: lease due deliveries, send them, write the results back.

A delivery is one event on its way to one subscribed endpoint. One relay runs these parts on one
event loop, each in a module of its own, sharing a `RelayState` (outbox_relay.state):
- the endpoint loop (outbox_relay.endpoint_loop) seeds the endpoints from the settings once at
  start (`seed_from_settings`: with only NOTIFICATION_SERVICE_URL the relay behaves as before
  subscriptions), then reloads the endpoints every second and at once when a change is NOTIFYed
  on ENDPOINTS_CHANNEL;
- each ACTIVE endpoint with a URL has a lane (outbox_relay.lanes): its own HTTP client, signing
  keys, queue and workers (outbox_relay.workers), and its share of RELAY_CONCURRENCY;
- the claimer (outbox_relay.claimer) leases due deliveries (`FOR UPDATE SKIP LOCKED`, one short
  statement) with a budget per lane, when woken by a NOTIFY, by the poll timer, by a delivery
  that unblocks the next one of a payment, or by a lane that has room again, and queues each on
  its lane;
- the recorder (outbox_relay.recorder) writes finished attempts back in batches, one statement
  per batch, checking each row's claim token (row by row when the database refuses a batch's
  values: one bad row never holds back the others);
- the listener (outbox_relay.listener) LISTENs on the outbox and endpoint channels and reconnects
  after a database restart;
- housekeeping and the metric gauges run on timers (outbox_relay.timers);
- with GATEWAY=stripe, the gateway worker (outbox_relay.gateway_worker) finishes the charges and
  refunds that nobody finished, on a pool of its own.
This module is the process: it builds the parts, runs each loop under a supervisor, and stops.

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
- claiming (`Claimer._claim_budget`, `Claimer._probe`): a lane whose endpoint's breaker is
  closed claims its budget; an open breaker claims nothing (its deliveries wait, keeping their
  attempts); a half-open one sends one probe across all relays (`lease_probe`), the earliest
  pending delivery due or not, whose attempt does not count toward RELAY_MAX_ATTEMPTS;
- recording (`Recorder._attempts_recorded`): each batch's written attempts go, per endpoint, to
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
from collections.abc import Awaitable, Callable

from outbox_relay.claimer import Claimer
from outbox_relay.endpoint_loop import EndpointLoop
from outbox_relay.gateway_worker import GatewayWorker
from outbox_relay.listener import ListenerLost, listen
from outbox_relay.metrics import RelayMetrics
from outbox_relay.recorder import Recorder
from outbox_relay.state import RelayState, error_text, wait_for
from outbox_relay.timers import gauge_loop, housekeeping_loop
from outbox_relay.workers import Workers
from payment_service import __version__
from payment_service.config import Settings
from payment_service.database import UNAVAILABLE_ERRORS, create_pool
from payment_service.gateway.factory import gateway_from_settings

logger = logging.getLogger(__name__)

POOL_SIZE = 5  # claimer, recorder, endpoints, housekeeping, gauges
RESTART_DELAY_SECONDS = 0.5  # first wait before a failed loop restarts; doubles up to the max
MAX_RESTART_DELAY_SECONDS = 5.0
HEALTHY_RUN_SECONDS = 30.0  # a loop that ran this long before failing restarts with the first delay
FINAL_WRITE_SECONDS = 1.0  # part of the shutdown grace kept for writing the last results
CLOSE_TIMEOUT_SECONDS = 2.0

# Failures a loop waits out and logs as a warning: the database is away (restart, failover).
_WAITED_OUT: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, ListenerLost)


class Relay:
    """One relay process: its parts, the tasks that run them, and `run()`, which returns the exit
    code."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = RelayMetrics()
        self.state = RelayState(settings, self.metrics)
        self.recorder = Recorder(self.state)
        self.workers = Workers(self.state, self.recorder)
        self.endpoints = EndpointLoop(self.state, self.workers)
        self.claimer = Claimer(self.state, self.recorder)
        # Raises ConfigurationError (one line naming STRIPE_SECRET_KEY) for a gateway without a
        # key, before anything starts.
        gateway = gateway_from_settings(settings)
        self.gateway_worker = GatewayWorker(self.state, gateway) if gateway else None

    def stop(self) -> None:
        state = self.state
        if not state.stop.is_set():
            logger.info("stop requested; draining in-flight deliveries")
        state.stop.set()
        state.wake.set()
        for lane in state.all_lanes():
            lane.slot_freed.set()

    async def run(self) -> int:
        settings = self.settings
        state = self.state
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
        state.pool = await create_pool(settings.dsn(), min_size=0, max_size=POOL_SIZE)
        logger.info(
            "relay started",
            extra={
                "version": __version__,
                "concurrency": settings.relay_concurrency,
                "batch_size": settings.relay_batch_size,
                "lease_seconds": settings.relay_lease_seconds,
            },
        )
        claimer = asyncio.create_task(self._supervise("claimer", self.claimer.run))
        recorder = asyncio.create_task(self.recorder.run())
        background = [
            asyncio.create_task(self._supervise("endpoints", self.endpoints.run)),
            asyncio.create_task(self._supervise("listener", lambda: listen(state))),
            asyncio.create_task(self._supervise("housekeeping", lambda: housekeeping_loop(state))),
        ]
        if metrics_server is not None:
            background.append(
                asyncio.create_task(self._supervise("gauges", lambda: gauge_loop(state)))
            )
        gateway_task = None
        if self.gateway_worker is not None:
            gateway_task = asyncio.create_task(self._supervise("gateway", self.gateway_worker.run))
        closers = self.endpoints.closers
        try:
            await state.stop.wait()
            await self._drain(claimer, recorder, gateway_task)
        finally:
            if self.gateway_worker is not None:
                await self.gateway_worker.close()
            for task in [*background, *closers]:
                task.cancel()
            await asyncio.gather(*background, *closers, return_exceptions=True)
            for lane in state.all_lanes():
                await lane.client.aclose()
            await self._close_pool()
            if metrics_server is not None:
                self.metrics.shutdown(metrics_server)
        logger.info("relay stopped", extra={"outcomes": dict(self.recorder.outcomes)})
        return 0

    async def _drain(
        self,
        claimer: asyncio.Task[None],
        recorder: asyncio.Task[None],
        gateway_task: asyncio.Task[None] | None,
    ) -> None:
        """Stop claiming, let in-flight deliveries (and gateway operations) finish in the grace
        period, release the rest."""
        started = time.monotonic()
        grace = self.settings.relay_shutdown_grace_seconds
        deadline = started + grace
        drain_deadline = deadline - min(FINAL_WRITE_SECONDS, grace / 4)
        await _finish_within(
            claimer, *([gateway_task] if gateway_task else []), deadline=drain_deadline
        )
        workers: list[asyncio.Task[None]] = []
        for lane in self.state.all_lanes():
            self.workers.stop(lane)  # claimed but not started: back in line at once
            workers += lane.workers
        await _finish_within(*workers, deadline=drain_deadline)
        self.recorder.close()
        await _finish_within(recorder, deadline=max(deadline, time.monotonic() + 0.2))
        unwritten = self.recorder.unwritten
        if unwritten:
            logger.warning(
                "could not write every result before exiting; those leases run out instead",
                extra={"unwritten": unwritten},
            )
        logger.info(
            "drained", extra={"seconds": round(time.monotonic() - started, 3), "grace": grace}
        )

    async def _close_pool(self) -> None:
        pool = self.state.pool
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_SECONDS)
        except UNAVAILABLE_ERRORS:  # includes the timeout
            pool.terminate()

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run a loop until stop; when it fails, log it and start it again after a delay."""
        delay = RESTART_DELAY_SECONDS
        while not self.state.stop.is_set():
            started = time.monotonic()
            try:
                await body()
            except asyncio.CancelledError:
                raise
            except _WAITED_OUT as error:
                logger.warning(
                    "database unavailable; loop restarts after a delay",
                    extra={"loop": name, "error": error_text(error), "retry_in_seconds": delay},
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
        await wait_for(self.state.stop, seconds)


async def _finish_within(*tasks: asyncio.Task[None], deadline: float) -> None:
    """Wait for tasks until a monotonic deadline, then cancel what is left."""
    _done, pending = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0))
    for task in pending:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            logger.error("task failed during shutdown", exc_info=result)


def run_relay(settings: Settings) -> int:
    """`payment-service relay`: run until SIGTERM/SIGINT; the exit code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed where it exists
        return asyncio.run(Relay(settings).run())
    return uvloop.run(Relay(settings).run())
