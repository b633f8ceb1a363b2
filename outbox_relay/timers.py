"""The relay's loops on timers: housekeeping (outbox_relay.housekeeping, one relay at a time)
every RELAY_HOUSEKEEPING_INTERVAL, and the metric gauges of the database's backlog per endpoint
every few seconds (only when the relay serves its metrics)."""

from __future__ import annotations

import asyncio

from outbox_relay.housekeeping import housekeep
from outbox_relay.state import RelayState, wait_for
from payment_service.deliveries import select_backlog

GAUGE_INTERVAL_SECONDS = 5.0


async def housekeeping_loop(state: RelayState) -> None:
    """A pass, then RELAY_HOUSEKEEPING_INTERVAL seconds of rest, until the relay stops: a pass in
    progress ends after its current round, and the rest ends at once."""
    while not state.stop.is_set():
        async with state.connection() as conn:
            await housekeep(
                conn,
                retention_hours=state.settings.outbox_retention_hours,
                gateway_events_retention_days=state.settings.gateway_events_retention_days,
                stop=state.stop,
            )
        await wait_for(state.stop, state.settings.relay_housekeeping_interval)


async def gauge_loop(state: RelayState) -> None:
    while True:
        async with state.connection() as conn:
            backlog = await select_backlog(conn)
        state.metrics.set_backlog(backlog)
        await asyncio.sleep(GAUGE_INTERVAL_SECONDS)
