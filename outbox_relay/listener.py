"""The listener: LISTENs on the outbox and endpoint channels and wakes the part that has news.

A NOTIFY on OUTBOX_CHANNEL wakes every lane's claim loop, one on ENDPOINTS_CHANNEL the endpoint
loop. The LISTEN connection is its own (not pooled); an idle one is checked with SELECT 1, and a
lost one raises `ListenerLost`, so that the supervisor waits the database out and listens again,
catching up with whatever was committed or changed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from outbox_relay.state import RelayState, wait_for
from payment_service import ENDPOINTS_CHANNEL, OUTBOX_CHANNEL
from payment_service.database import connect

logger = logging.getLogger(__name__)

LISTENER_CHECK_SECONDS = 5.0  # how often an idle LISTEN connection is checked with SELECT 1


class ListenerLost(Exception):
    """The LISTEN connection to the database was lost."""


async def listen(state: RelayState) -> None:
    """Listen until the connection is lost (`ListenerLost`) or the task is cancelled."""

    def on_notification(*_args: Any) -> None:
        state.wake_lanes()

    def on_endpoint_change(*_args: Any) -> None:
        state.endpoints_changed.set()

    conn = await connect(state.settings.dsn())
    lost = asyncio.Event()
    try:
        conn.add_termination_listener(lambda _conn: lost.set())
        await conn.add_listener(OUTBOX_CHANNEL, on_notification)
        await conn.add_listener(ENDPOINTS_CHANNEL, on_endpoint_change)
        logger.info("listening for new events", extra={"channel": OUTBOX_CHANNEL})
        # catch up with whatever was committed or changed while not listening
        state.wake_lanes()
        state.endpoints_changed.set()
        while True:
            await wait_for(lost, LISTENER_CHECK_SECONDS)
            if lost.is_set() or conn.is_closed():
                raise ListenerLost("the LISTEN connection was closed")
            await conn.fetchval("SELECT 1", timeout=LISTENER_CHECK_SECONDS)
    finally:
        conn.terminate()
