"""The claimer: each lane leases its own endpoint's due deliveries and queues them (`run(lane)`).

Each lane claims for itself, in a loop of its own, on a connection of its own pool: a claim that
is slow or fails for one endpoint (its backlog, its bloat, a lock) never delays another's. A lane
claims (`FOR UPDATE SKIP LOCKED`, one short statement) when woken by a NOTIFY, by the poll timer,
by a delivery that unblocks the next one of a payment, or by having room again. Endpoint health is
wired in here: a lane whose endpoint's breaker is closed claims its budget (`_claim_budget`); an
open breaker claims nothing (its deliveries wait, keeping their attempts); a half-open one sends
one probe across all relays (`_probe`, `lease_probe`), the earliest pending delivery due or not,
whose attempt does not count toward RELAY_MAX_ATTEMPTS.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
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
    """The lanes' claim loops (`run`), each until its lane is retired or the relay stops."""

    def __init__(self, state: RelayState, recorder: Recorder) -> None:
        self.state = state
        self.recorder = recorder

    async def run(self, lane: Lane) -> None:
        state = self.state
        settings = state.settings
        while not state.stop.is_set() and not lane.retired:
            lane.wake.clear()
            probing = lane.endpoint.breaker == "half_open"
            budget = 0 if probing else self._claim_budget(lane)
            if not probing and budget == 0:  # breaker open, or the lane holds enough: wait
                await wait_for(lane.wake, settings.relay_poll_interval)
                continue
            lease_deadline = time.monotonic() + settings.relay_lease_seconds
            async with lane.connection() as conn:
                if probing:
                    probe = await self._probe(conn, lane)
                    events = [] if probe is None else [probe]
                else:
                    with self._claim_token(lane) as token:
                        events = await outbox.claim_deliveries(
                            conn,
                            lane.endpoint_id,
                            limit=budget,
                            lease_seconds=settings.relay_lease_seconds,
                            token=token,
                        )
            for event in events:
                if lane.retired:  # retired while the claim ran: back in line
                    self.recorder.release(lane, event)
                    continue
                lane.held += 1
                lane.queue.put_nowait((event, lease_deadline))
            state.metrics.claimed.inc(len(events))
            if probing or len(events) < budget:
                # caught up (or probing): wait for news or the next poll
                await wait_for(lane.wake, settings.relay_poll_interval)

    @contextlib.contextmanager
    def _claim_token(self, lane: Lane) -> Iterator[uuid.UUID]:
        """A new claim's token. If the claim raises, it may have committed (on failover: reached
        the standby) with its answer lost: its leases are released rather than left to run out."""
        token = uuid.uuid4()
        try:
            yield token
        except BaseException:
            self.recorder.claim_lost(lane, token)
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
        if lane.held or lane.waiting or lane.retired:
            return None
        if not await lease_probe(
            conn,
            lane.endpoint_id,
            lease_seconds=settings.relay_lease_seconds,
            state_changes=self.state.metrics.endpoint_state_changes,
        ):
            return None
        with self._claim_token(lane) as token:
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
