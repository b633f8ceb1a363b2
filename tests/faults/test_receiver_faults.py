"""The Notification Service misbehaves while the relay delivers under load; the Trip Service, the
second endpoint, stays healthy throughout.

- Notification disappears (stops listening, drops idle connections), comes back, then answers 500
  for a while: trip keeps getting new events while notification is down, every event is still
  delivered to both, and none twice — no process crashed, so a duplicate would be the relay's fault.
- Notification answers the first request of every event more slowly than RELAY_REQUEST_TIMEOUT:
  the relay gives up on it (the receiver sees the connection close), retries, and every event is
  delivered; only the abandoned requests are repeats, and trip never saw one.
"""

from __future__ import annotations

import pytest

from tests.faults.harness import (
    LoadGenerator,
    ServiceStack,
    assert_clients_got_what_the_database_holds,
    assert_every_event_delivered,
)
from tests.support.database import DELIVERY_ROWS, FaultDatabase
from tests.support.receiver import (
    Receiver,
    answer_ok,
    answer_status,
    hang_first_request_of_each_event,
)
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# The relay's request timeout in the slow-receiver test: long enough that a prompt answer is never
# mistaken for a slow one on a busy machine, short enough to keep the test quick.
SLOW_TIMEOUT_SECONDS = 3


async def _failed_attempts(db: FaultDatabase) -> int:
    """Deliveries to notification whose last attempt failed and that wait for another."""
    return int(
        await db.fetchval(
            f"SELECT count(*) FROM {DELIVERY_ROWS} WHERE endpoint = 'notification'"
            " AND status = 'PENDING' AND attempts > 0 AND last_error IS NOT NULL"
        )
    )


async def test_receiver_down_then_failing_then_back(
    stack: ServiceStack, fault_db: FaultDatabase, receiver: Receiver, trip: Receiver
) -> None:
    api = await stack.api(workers=1)
    stack.relay()
    load = LoadGenerator([api.base_url], clients=4, seed=3)
    load.start()
    try:
        await wait_for(lambda: len(receiver.accepted_ids()) >= 10, timeout=60, what="deliveries")

        await receiver.stop_listening(answer_in_flight=True)
        # Down until the relay has recorded a failed attempt and rescheduled the event.
        await wait_for(
            lambda: _failed_attempts(fault_db), timeout=60, what="a failed delivery recorded"
        )
        # Notification's failures hold nothing up at the other endpoint.
        target = len(trip.accepted_ids()) + 10
        await wait_for(
            lambda: len(trip.accepted_ids()) >= target,
            timeout=60,
            what="trip to get new events while notification is down",
        )
        receiver.policy = answer_status(500)
        await receiver.listen_again()
        await wait_for(
            lambda: any(d.status == 500 for d in receiver.deliveries),
            timeout=60,
            what="the relay to be answered 500",
        )
        receiver.policy = answer_ok
        target = load.successes() + 20
        await wait_for(lambda: load.successes() >= target, timeout=60, what="more load")
    finally:
        await load.finish()

    await assert_clients_got_what_the_database_holds(load, fault_db)
    await assert_every_event_delivered(stack, timeout=120, exactly_once=True)
    await stack.check()


async def test_receiver_slower_than_the_request_timeout(
    stack: ServiceStack, fault_db: FaultDatabase, receiver: Receiver, trip: Receiver
) -> None:
    receiver.policy = hang_first_request_of_each_event()  # until the relay hangs up
    api = await stack.api(workers=1)
    stack.relay(relay_request_timeout=SLOW_TIMEOUT_SECONDS)
    load = LoadGenerator([api.base_url], clients=3, seed=4)
    load.start()
    try:
        await wait_for(lambda: load.successes() >= 30, timeout=90, what="load to run")
    finally:
        await load.finish()

    await assert_clients_got_what_the_database_holds(load, fault_db)
    events = await assert_every_event_delivered(stack, timeout=120, exactly_once=True)
    stalled = [d for d in receiver.deliveries if d.stalled]
    assert {d.event_id for d in stalled} == {row["event_id"] for row in events}
    assert all(d.relay_hung_up for d in stalled), "the relay waited past its request timeout"
    assert len(trip.deliveries) == len(events), "trip was sent an event twice"
    await stack.check()
