"""What the relay's parts share: the settings, the metrics, the pool, the lanes and the events
that wake one part when another has news.

One `RelayState` per relay process (outbox_relay.main builds it), passed to each part: the
claimer, the recorder, the workers, the endpoint loop, the listener and the timers. Each part
owns its own state besides; only what two or more of them read or set lives here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg

from outbox_relay.lanes import Lane
from outbox_relay.metrics import RelayMetrics
from payment_service.config import Settings
from payment_service.database import PooledConnection, acquire


@dataclass(eq=False)
class RelayState:
    settings: Settings
    metrics: RelayMetrics
    pool: asyncpg.Pool | None = None  # opened by `Relay.run`
    lanes: dict[int, Lane] = field(default_factory=dict)  # by endpoint id: delivered to now
    retiring: set[Lane] = field(default_factory=set)  # lanes finishing their in-flight deliveries
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Something may be claimable, or a lane has room again: the claimer looks.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # An endpoint changed (a NOTIFY on ENDPOINTS_CHANNEL): the endpoint loop reads them at once.
    endpoints_changed: asyncio.Event = field(default_factory=asyncio.Event)

    def all_lanes(self) -> list[Lane]:
        return [*self.lanes.values(), *self.retiring]

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
