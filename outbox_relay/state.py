"""What the relay's parts share: the settings, the metrics, the pool, the lanes and the events
that wake one part when another has news; and `supervise`, which runs a loop until it is told to
stop, restarting it after a delay when it fails.

One `RelayState` per relay process (outbox_relay.main builds it), passed to each part: the
claimer, the recorder, the workers, the lane runner, the endpoint loop, the listener and the
timers. Each part owns its own state besides; only what two or more of them read or set lives
here (a lane's own events live on its `Lane`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from outbox_relay.lanes import Lane
from outbox_relay.metrics import RelayMetrics
from payment_service.config import Settings
from payment_service.database import UNAVAILABLE_ERRORS, PooledConnection, acquire

logger = logging.getLogger(__name__)

RESTART_DELAY_SECONDS = 0.5  # first wait before a failed loop restarts; doubles up to the max
MAX_RESTART_DELAY_SECONDS = 5.0
HEALTHY_RUN_SECONDS = 30.0  # a loop that ran this long before failing restarts with the first delay
CLOSE_TIMEOUT_SECONDS = 2.0  # a pool not closed by then (its server gone) is terminated


@dataclass(eq=False)
class RelayState:
    settings: Settings
    metrics: RelayMetrics
    # The endpoint loop's, housekeeping's and the gauges' (each lane has its own): opened by
    # `Relay.run`.
    pool: asyncpg.Pool | None = None
    lanes: dict[int, Lane] = field(default_factory=dict)  # by endpoint id: delivered to now
    retiring: set[Lane] = field(default_factory=set)  # lanes finishing their in-flight deliveries
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # An endpoint changed (a NOTIFY on ENDPOINTS_CHANNEL): the endpoint loop reads them at once.
    endpoints_changed: asyncio.Event = field(default_factory=asyncio.Event)

    def all_lanes(self) -> list[Lane]:
        return [*self.lanes.values(), *self.retiring]

    def wake_lanes(self) -> None:
        """Something may be claimable for every endpoint (a NOTIFY, a change): every lane looks."""
        for lane in self.lanes.values():
            lane.wake.set()

    def connection(self) -> PooledConnection:
        """A pooled connection, waited for as long as it takes (the pool is sized for the loops)."""
        assert self.pool is not None, "the pool is opened by Relay.run"
        return acquire(self.pool, timeout=None)


async def wait_for(event: asyncio.Event, timeout: float) -> None:
    """Wait until `event` is set or `timeout` seconds pass, whichever comes first."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


async def supervise(
    state: RelayState,
    name: str,
    body: Callable[[], Awaitable[None]],
    *,
    waited_out: tuple[type[BaseException], ...] = UNAVAILABLE_ERRORS,
    done: Callable[[], bool] = lambda: False,
    endpoint: str | None = None,
) -> None:
    """Run a loop until the relay stops (or `done()`); when it fails, log it and start it again
    after a delay. A failure of `waited_out` (the database is away: a restart, a failover) is a
    warning; any other is logged with its traceback. `endpoint`: the lane's, for the logs."""
    delay = RESTART_DELAY_SECONDS
    context = {"loop": name} if endpoint is None else {"loop": name, "endpoint": endpoint}
    while not state.stop.is_set() and not done():
        started = time.monotonic()
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except waited_out as error:
            logger.warning(
                "database unavailable; loop restarts after a delay",
                extra={**context, "error": error_text(error), "retry_in_seconds": delay},
            )
        except Exception:
            logger.exception(
                "relay loop crashed; it restarts after a delay",
                extra={**context, "retry_in_seconds": delay},
            )
        else:
            continue
        state.metrics.loop_restarts.labels(name).inc()
        await wait_for(state.stop, delay)  # wakes at once on stop
        # Back off while failures come one after another; start afresh after a good run.
        ran_well = time.monotonic() - started > HEALTHY_RUN_SECONDS
        delay = RESTART_DELAY_SECONDS if ran_well else min(delay * 2, MAX_RESTART_DELAY_SECONDS)


async def close_pool(pool: asyncpg.Pool | None) -> None:
    """Close a pool (the relay's or a lane's); terminate it if its server does not answer."""
    if pool is None:
        return
    try:
        await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_SECONDS)
    except UNAVAILABLE_ERRORS:  # includes the timeout
        pool.terminate()
