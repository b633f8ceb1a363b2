"""The claimer: leases due deliveries and queues each on its endpoint's lane.

It claims (`FOR UPDATE SKIP LOCKED`, one short statement) with a budget per lane, when woken by a
NOTIFY, by the poll timer, by a delivery that unblocks the next one of a payment, or by a lane
that has room again. Endpoint health is wired in here: a lane whose endpoint's breaker is closed
claims its budget (`_claim_budget`); an open breaker claims nothing (its deliveries wait, keeping
their attempts); a half-open one sends one probe across all relays (`_probe`, `lease_probe`), the
earliest pending delivery due or not, whose attempt does not count toward RELAY_MAX_ATTEMPTS.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import asyncpg

from outbox_relay import outbox
from outbox_relay.endpoint_health import end_probe, lease_probe
from outbox_relay.lanes import Lane
from outbox_relay.outbox import ClaimedEvent
from outbox_relay.recorder import Recorder
from outbox_relay.state import RelayState, wait_for

logger = logging.getLogger(__name__)


class Claimer:
    """The claim loop (`run`), until the relay stops."""

    def __init__(self, state: RelayState, recorder: Recorder) -> None:
        self.state = state
        self.recorder = recorder

    async def run(self) -> None:
        state = self.state
        settings = state.settings
        while not state.stop.is_set():
            state.wake.clear()
            budgets = {
                lane.endpoint_id: budget
                for lane in state.lanes.values()
                if (budget := self._claim_budget(lane)) > 0
            }
            probing = [
                lane for lane in state.lanes.values() if lane.endpoint.breaker == "half_open"
            ]
            if not budgets and not probing:  # no endpoint, or every lane full: wait
                await wait_for(state.wake, settings.relay_poll_interval)
                continue
            lease_deadline = time.monotonic() + settings.relay_lease_seconds
            events: list[ClaimedEvent] = []
            async with state.connection() as conn:
                for half_open in probing:
                    if (probe := await self._probe(conn, half_open)) is not None:
                        events.append(probe)
                if budgets:
                    with self._claim_token() as token:
                        events += await outbox.claim_deliveries(
                            conn,
                            budgets=budgets,
                            lease_seconds=settings.relay_lease_seconds,
                            token=token,
                        )
            claimed: Counter[int] = Counter()
            for event in events:
                claimed[event.endpoint_id] += 1
                lane = state.lanes.get(event.endpoint_id)
                if lane is None:  # retired while the claim ran: back in line
                    self.recorder.release_unqueued(event)
                    continue
                lane.held += 1
                lane.queue.put_nowait((event, lease_deadline))
            state.metrics.claimed.inc(len(events))
            if all(claimed[endpoint_id] < n for endpoint_id, n in budgets.items()):
                # every endpoint caught up: wait for news or the next poll
                await wait_for(state.wake, settings.relay_poll_interval)

    @contextlib.contextmanager
    def _claim_token(self) -> Iterator[uuid.UUID]:
        """A new claim's token. If the claim raises, it may have committed (on failover: reached
        the standby) with its answer lost: its leases are released rather than left to run out."""
        token = uuid.uuid4()
        try:
            yield token
        except BaseException:
            self.recorder.claim_lost(token)
            raise

    def _claim_budget(self, lane: Lane) -> int:
        """How many deliveries to claim for the lane now: its budget while its endpoint's breaker
        is closed, nothing while it is open; a half-open breaker's one probe goes through
        `_probe` instead. (The claim statement checks the breaker too: a relay whose copy of the
        endpoint is a moment old never claims a batch for an open breaker.)"""
        if lane.endpoint.breaker != "closed":
            return 0
        return lane.budget(self.state.settings.relay_batch_size)

    async def _probe(self, conn: asyncpg.Connection, lane: Lane) -> ClaimedEvent | None:
        """A half-open breaker's probe: take the one probe lease every relay competes for, then
        the earliest pending delivery of the endpoint, due or not. None: no probe now (another
        relay's is in flight, the cooldown is not over, or nothing waits)."""
        settings = self.state.settings
        if lane.endpoint.breaker != "half_open" or lane.held or lane.retired:
            return None
        if not await lease_probe(
            conn,
            lane.endpoint_id,
            lease_seconds=settings.relay_lease_seconds,
            state_changes=self.state.metrics.endpoint_state_changes,
        ):
            return None
        with self._claim_token() as token:
            event = await outbox.claim_probe(
                conn, lane.endpoint_id, lease_seconds=settings.relay_lease_seconds, token=token
            )
        if event is None:
            await end_probe(conn, lane.endpoint_id)
        else:
            logger.info(
                "probing endpoint",
                extra={"endpoint": lane.name, "event_id": event.event_id},
            )
        return event
