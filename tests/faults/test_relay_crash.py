"""kill -9 of the relay in the middle of a batch, twice, while payments keep coming.

Before each kill the receiver holds every new callback unanswered until at least one is in
flight, so the relay provably dies mid-delivery; its leases then run out and a restarted relay
delivers what it had claimed. Every event is delivered; an event reaches the receiver twice only
if it was in flight or freshly acknowledged when the relay died (same webhook-id each time).
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
    stack: ServiceStack, fault_db: FaultDatabase, receiver: Receiver
) -> None:
    api = await stack.api(workers=1)
    relay = stack.relay(relay_lease_seconds=LEASE_SECONDS)
    load = LoadGenerator([api.base_url], clients=3, seed=6)
    load.start()
    kills: list[int] = []  # how many requests the receiver had seen at each kill
    try:
        for crash in range(CRASHES):
            target = len(receiver.accepted_ids()) + 10
            await wait_for(
                lambda: len(receiver.accepted_ids()) >= target,  # noqa: B023 - awaited at once
                timeout=90,
                what=f"deliveries before crash {crash + 1}",
            )
            receiver.hold()
            await wait_for(lambda: receiver.held() >= 1, timeout=60, what="a delivery in flight")
            await relay.kill9()
            # Whatever the dead relay sent has been read once its connections are all closed;
            # only then is the count of requests "everything sent before the crash".
            await wait_for(
                lambda: receiver.open_connections() == 0,
                timeout=30,
                what="the dead relay's connections to close",
            )
            kills.append(len(receiver.deliveries))
            receiver.release()
            relay.start()
        target = load.successes() + 20
        await wait_for(lambda: load.successes() >= target, timeout=90, what="more load")
    finally:
        await load.finish()

    await assert_clients_got_what_the_database_holds(load, fault_db)
    await assert_every_event_delivered(fault_db, receiver, timeout=120, exactly_once=False)
    # Repeats only for events the relay was busy with when it died.
    first_seen: dict[str, int] = {}
    for position, delivery in enumerate(receiver.deliveries):
        assert delivery.event_id is not None
        first = first_seen.setdefault(delivery.event_id, position)
        if first != position:
            assert any(first < kill <= position for kill in kills), (
                f"event {delivery.event_id} was sent again without a crash in between"
            )
    assert sum(d.stalled for d in receiver.deliveries) >= CRASHES
    await stack.check()
    assert relay.running() and relay.starts == CRASHES + 1
