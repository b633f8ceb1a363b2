"""kill -9 of the relay in the middle of a batch, twice, while payments keep coming.

Before each kill both endpoints' receivers hold every new callback unanswered until each has at
least one in flight, so the relay provably dies mid-delivery to both; its leases then run out and
a restarted relay delivers what it had claimed. Every event is delivered to both endpoints; an
event reaches a receiver twice only if it was in flight or freshly acknowledged there when the
relay died (same webhook-id each time).
"""

from __future__ import annotations

import pytest

from tests.faults.harness import (
    LoadGenerator,
    ServiceStack,
    assert_clients_got_what_the_database_holds,
    assert_every_event_delivered,
)
from tests.support.database import FaultDatabase
from tests.support.receiver import Receiver
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CRASHES = 2
LEASE_SECONDS = 3  # a dead relay's claims come back this soon


async def test_kill_9_of_the_relay_mid_batch_loses_no_event(
    stack: ServiceStack, fault_db: FaultDatabase
) -> None:
    receivers = list(stack.endpoints.values())
    api = await stack.api(workers=1)
    relay = stack.relay(relay_lease_seconds=LEASE_SECONDS)
    load = LoadGenerator([api.base_url], clients=3, seed=6)
    load.start()
    # Per receiver: how many requests it had seen at each kill.
    kills: dict[Receiver, list[int]] = {r: [] for r in receivers}
    try:
        for crash in range(CRASHES):
            targets = {r: len(r.accepted_ids()) + 10 for r in receivers}
            await wait_for(
                lambda: all(len(r.accepted_ids()) >= targets[r] for r in receivers),  # noqa: B023
                timeout=90,
                what=f"deliveries to both endpoints before crash {crash + 1}",
            )
            for r in receivers:
                r.hold()
            await wait_for(
                lambda: all(r.held() >= 1 for r in receivers),
                timeout=60,
                what="a delivery in flight to each endpoint",
            )
            await relay.kill9()
            # Whatever the dead relay sent has been read once its connections are all closed;
            # only then is the count of requests "everything sent before the crash".
            await wait_for(
                lambda: all(r.open_connections() == 0 for r in receivers),
                timeout=30,
                what="the dead relay's connections to close",
            )
            for r in receivers:
                kills[r].append(len(r.deliveries))
                r.release()
            relay.start()
        target = load.successes() + 20
        await wait_for(lambda: load.successes() >= target, timeout=90, what="more load")
    finally:
        await load.finish()

    await assert_clients_got_what_the_database_holds(load, fault_db)
    await assert_every_event_delivered(stack, timeout=120, exactly_once=False)
    for name, receiver in stack.endpoints.items():
        # Repeats only for events the relay was busy with at this endpoint when it died.
        first_seen: dict[str, int] = {}
        for position, delivery in enumerate(receiver.deliveries):
            assert delivery.event_id is not None
            first = first_seen.setdefault(delivery.event_id, position)
            if first != position:
                assert any(first < kill <= position for kill in kills[receiver]), (
                    f"{name}: event {delivery.event_id} was sent again without a crash in between"
                )
        assert sum(d.stalled for d in receiver.deliveries) >= CRASHES, name
    await stack.check()
    assert relay.running() and relay.starts == CRASHES + 1
