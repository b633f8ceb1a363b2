"""The test's PostgreSQL crashes (immediate stop) and comes back while the API and the relay run
under load.

While it is down, every answer the API gives is 503 with Retry-After (problem code
DATABASE_UNAVAILABLE) — never a 500, never a hang (clients time out after 20 s, which fails the
test). Afterwards the API and the relay recover by themselves (neither is restarted), the clients'
retries with their keys complete, every event is delivered to both endpoints, and
`payment-service check` passes.
"""

from __future__ import annotations

import asyncio

import httpx
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROGRESS = 30  # successful operations before the outage and again after it
OUTAGE_503S = 30  # 503s the clients must have seen before the database comes back (several s)


async def test_database_restart_under_load(
    stack: ServiceStack, fault_db: FaultDatabase, receiver: Receiver, trip: Receiver
) -> None:
    loop = asyncio.get_running_loop()
    api = await stack.api(workers=2)
    relay = stack.relay()
    load = LoadGenerator([api.base_url], clients=6, seed=2)
    load.start()
    try:
        await wait_for(lambda: load.successes() >= PROGRESS, timeout=90, what="load to run")
        await wait_for(
            lambda: len(receiver.accepted_ids()) >= 10 and len(trip.accepted_ids()) >= 10,
            timeout=60,
            what="deliveries to both endpoints",
        )

        await fault_db.stop(immediate=True)
        down_at = loop.time()

        def outage_503s() -> int:
            return sum(a.status == 503 and a.sent_at >= down_at for _, a in load.answers())

        # The database stays down until the clients have been answered 503 a few times: the
        # outage lasts as long as it takes to prove that, however slow the machine.
        await wait_for(
            lambda: outage_503s() >= OUTAGE_503S, timeout=60, what="503s during the outage"
        )
        async with httpx.AsyncClient(base_url=api.base_url, timeout=20) as client:
            health = await client.get("/health")
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "unhealthy"
        up_at = loop.time()
        await fault_db.start()

        target = load.successes() + PROGRESS
        await wait_for(
            lambda: load.successes() >= target, timeout=120, what="the API to recover under load"
        )
    finally:
        await load.finish()

    print("answers by status:", dict(load.status_counts()))
    during = [
        answer
        for _, answer in load.answers()
        if answer.sent_at >= down_at and answer.received_at <= up_at
    ]
    assert during, "no request was answered during the outage"
    wrong = [
        (answer.status, answer.error, answer.code)
        for answer in during
        if not (answer.status == 503 or (answer.error is not None and not answer.timed_out))
    ]
    assert not wrong, f"answers during the outage other than 503 or a connection error: {wrong}"
    await assert_clients_got_what_the_database_holds(load, fault_db)
    # A relay that was acknowledged by a receiver but could not record it may send again.
    await assert_every_event_delivered(stack, timeout=120, exactly_once=False)
    await stack.check()
    # Both recovered by themselves: neither exited nor was restarted.
    assert api.running() and api.starts == 1, api.log_tail()
    assert relay.running() and relay.starts == 1, relay.log_tail()
