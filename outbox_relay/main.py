"""The relay process: lease due deliveries, send them, write the results back.

A delivery is one event on its way to one subscribed endpoint. One relay runs these parts on one
event loop, each in a module of its own, sharing a `RelayState` (outbox_relay.state):
- the endpoint loop (outbox_relay.endpoint_loop) seeds the endpoints from the settings once at
  start (`seed_from_settings`: with only NOTIFICATION_SERVICE_URL the relay behaves as before
  subscriptions), then reloads the endpoints every second and at once when a change is NOTIFYed
  on ENDPOINTS_CHANNEL;
- each ACTIVE endpoint with a URL has a lane (outbox_relay.lanes), and everything below runs per
  lane, started and stopped together by outbox_relay.lane_runner: its own connection pool, HTTP
  client, signing keys, queue and workers (outbox_relay.workers), and its share of
  RELAY_CONCURRENCY;
- the lane's claim loop (outbox_relay.claimer) leases its endpoint's due deliveries (`FOR UPDATE
  SKIP LOCKED`, one short statement) when woken by a NOTIFY, by the poll timer, by a delivery that
  unblocks the next one of a payment, or by having room again, and queues them;
- the lane's recorder (outbox_relay.recorder) writes its finished attempts back in batches, one
  statement per batch, checking each row's claim token (row by row when the database refuses a
  batch's values: one bad row never holds back the others), then feeds its endpoint's health;
- the listener (outbox_relay.listener) LISTENs on the outbox and endpoint channels and reconnects
  after a database restart;
- housekeeping and the metric gauges run on timers (outbox_relay.timers), on the relay's own
  small pool with the endpoint loop;
- with GATEWAY=stripe, the gateway worker (outbox_relay.gateway_worker) finishes the charges and
  refunds that nobody finished, on a pool of its own, and every GATEWAY_RECONCILE_INTERVAL one
  relay reconciles our charges and refunds with the gateway's (outbox_relay.reconciler).
This module is the process: it builds the parts, runs each loop under a supervisor
(`outbox_relay.state.supervise`), and stops.

Independence: an endpoint that is down, slow (answers after the timeout) or answers 500 to some
of its callbacks must never delay another's deliveries, however busy the API. Four things see to
it:
1. in flight: a lane sends at most its share of RELAY_CONCURRENCY (ceil(concurrency / lanes), at
   least one) at once, with workers of its own, so a hanging endpoint holds its own workers and
   never anyone else's; a retryable failure waits out its quick retry holding no worker and no
   slot, so a flapping endpoint keeps sending (and draining) at the rate its receiver answers;
   and a lane's slots shrink with the share of its tries that fail (Lane.in_flight_allowed), so
   when the relay's CPU runs short the tries of a failing endpoint take less of it;
2. claiming: each lane claims for itself, on its own connections, up to its own room (claimed
   only once it has drained to its low water mark), so one endpoint's backlog never fills
   another's claim, and a claim that is slow for one endpoint (its backlog, the bloat of its
   rows) never delays another's;
3. recording: each lane writes its own results and its endpoint's health on its own
   connections, so one endpoint's churn never holds back another's writes;
4. order per (endpoint, payment) only: a delivery waits for an earlier PENDING delivery of the
   same payment to the same endpoint, never for another endpoint's.
Endpoint health (outbox_relay.health, outbox_relay.endpoint_health) is wired in two places:
- claiming (`Claimer._claim_budget`, `Claimer._probe`): a lane whose endpoint's breaker is
  closed claims its budget; an open breaker claims nothing (its deliveries wait, keeping their
  attempts); a half-open one sends one probe across all relays (`lease_probe`), the earliest
  pending delivery due or not, whose attempt does not count toward RELAY_MAX_ATTEMPTS;
- recording (`Recorder._record_health`): each batch's written attempts go to `record_health`,
  which opens, reopens or closes the breaker, and disables the endpoint on 410 Gone (that
  delivery stays PENDING until `endpoints enable`) or after ENDPOINT_DISABLE_AFTER_HOURS of
  failure. Every change is logged and counted there, and NOTIFYed, so every relay reloads the
  endpoint at once; a relay also logs each change it sees in the endpoints it reloads.

A loop that fails is logged and restarted after a delay. SIGTERM/SIGINT stop the claim loops,
let in-flight deliveries finish within RELAY_SHUTDOWN_GRACE_SECONDS, release the rest, and exit
0; results (and lost claims) it could not write by then are counted in a warning, and their
leases run out instead.
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
from outbox_relay.lane_runner import LaneRunner
from outbox_relay.listener import ListenerLost, listen
from outbox_relay.metrics import RelayMetrics
from outbox_relay.reconciler import Reconciler
from outbox_relay.recorder import Recorder
from outbox_relay.state import RelayState, close_pool, supervise
from outbox_relay.timers import gauge_loop, housekeeping_loop
from outbox_relay.workers import Workers
from payment_service import __version__
from payment_service.config import Settings
from payment_service.database import UNAVAILABLE_ERRORS, create_pool
from payment_service.gateway.factory import gateway_from_settings

logger = logging.getLogger(__name__)

# The relay's own pool: the endpoint loop, housekeeping, the gauges. Each lane has a pool of its
# own for its claims and results (outbox_relay.lanes.LANE_POOL_SIZE).
POOL_SIZE = 3
FINAL_WRITE_SECONDS = 1.0  # part of the shutdown grace kept for writing the last results

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
        self.claimer = Claimer(self.state, self.recorder)
        self.runner = LaneRunner(self.state, self.claimer, self.recorder, self.workers)
        self.endpoints = EndpointLoop(self.state, self.runner)
        # Raises ConfigurationError (one line naming STRIPE_SECRET_KEY) for a gateway without a
        # key, before anything starts.
        gateway = gateway_from_settings(settings)
        self.gateway_worker = GatewayWorker(self.state, gateway) if gateway else None
        self.reconciler = (
            Reconciler(self.state, gateway)
            if gateway and settings.gateway_reconcile_interval > 0
            else None
        )

    def stop(self) -> None:
        state = self.state
        if not state.stop.is_set():
            logger.info("stop requested; draining in-flight deliveries")
        state.stop.set()
        for lane in state.all_lanes():
            self.runner.stop_claiming(lane)

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
        endpoints = asyncio.create_task(self._supervise("endpoints", self.endpoints.run))
        background = [
            asyncio.create_task(self._supervise("listener", lambda: listen(state))),
            asyncio.create_task(self._supervise("housekeeping", lambda: housekeeping_loop(state))),
        ]
        if metrics_server is not None:
            background.append(
                asyncio.create_task(self._supervise("gauges", lambda: gauge_loop(state)))
            )
        if self.reconciler is not None:
            # Cut short at the stop like housekeeping (a run holds nothing a restart cannot redo).
            background.append(
                asyncio.create_task(self._supervise("reconciliation", self.reconciler.run))
            )
        gateway_task = None
        if self.gateway_worker is not None:
            gateway_task = asyncio.create_task(self._supervise("gateway", self.gateway_worker.run))
        closers = self.endpoints.closers
        try:
            await state.stop.wait()
            endpoints.cancel()  # no lane opens or retires while the lanes drain
            await asyncio.gather(endpoints, return_exceptions=True)
            await self._drain(gateway_task)
        finally:
            if self.gateway_worker is not None:
                await self.gateway_worker.close()
            endpoints.cancel()
            for task in [*background, *closers]:
                task.cancel()
            await asyncio.gather(endpoints, *background, *closers, return_exceptions=True)
            leftovers = [
                task
                for lane in state.all_lanes()
                for task in (lane.claiming, lane.recording, *self.workers.tasks(lane))
                if task is not None and not task.done()
            ]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            for lane in state.all_lanes():
                await self.runner.close_connections(lane)
            await close_pool(state.pool)
            if metrics_server is not None:
                self.metrics.shutdown(metrics_server)
        logger.info("relay stopped", extra={"outcomes": dict(self.recorder.outcomes)})
        return 0

    async def _drain(self, gateway_task: asyncio.Task[None] | None) -> None:
        """Stop claiming, let in-flight deliveries (and gateway operations) finish in the grace
        period, release the rest, write the results: every lane at once, each step within the
        deadline."""
        started = time.monotonic()
        grace = self.settings.relay_shutdown_grace_seconds
        deadline = started + grace
        drain_deadline = deadline - min(FINAL_WRITE_SECONDS, grace / 4)
        lanes = self.state.all_lanes()
        await _finish_within(
            *(lane.claiming for lane in lanes if lane.claiming is not None),
            *([gateway_task] if gateway_task is not None else []),
            deadline=drain_deadline,
        )
        for lane in lanes:
            self.workers.stop(lane)  # claimed but not started: back in line at once
        await _finish_within(*(w for lane in lanes for w in lane.workers), deadline=drain_deadline)
        # then the quick retries, those the last tries started included (a stop ends their wait)
        await _finish_within(*(r for lane in lanes for r in lane.retries), deadline=drain_deadline)
        for lane in lanes:
            self.recorder.close(lane)
        await _finish_within(
            *(lane.recording for lane in lanes if lane.recording is not None),
            deadline=max(deadline, time.monotonic() + 0.2),
        )
        # Results, releases and lost claims' tokens not written: their leases run out instead.
        unwritten = sum(len(lane.unwritten) for lane in lanes)
        if unwritten:
            logger.warning(
                "could not write every result before exiting; those leases run out instead",
                extra={"unwritten": unwritten},
            )
        logger.info(
            "drained", extra={"seconds": round(time.monotonic() - started, 3), "grace": grace}
        )

    async def _supervise(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        await supervise(self.state, name, body, waited_out=_WAITED_OUT)


async def _finish_within(*tasks: asyncio.Task[None], deadline: float) -> None:
    """Wait for tasks until a monotonic deadline, then cancel what is left."""
    if not tasks:
        return
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
