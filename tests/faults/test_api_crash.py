"""kill -9 of the API (2 Hypercorn workers) three times while clients create payments and refunds.

The clients retry every request with its idempotency key until they get a definitive answer, as
the seed guide tells them to. After the crashes and restarts: every 2xx answer is in the database
exactly as answered, no key made a second payment or refund, nothing exists that no client was
told about, `payment-service check` passes, and every event reaches both endpoints exactly once.
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
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CRASHES = 3
# Operations that must succeed between two crashes (and after the last restart): proof that the
# API was serving under load when it was killed, and that it serves again after each restart.
PROGRESS_PER_ROUND = 25


async def test_kill_9_of_the_api_under_load_loses_nothing(
    stack: ServiceStack, fault_db: FaultDatabase
) -> None:
    api = await stack.api(workers=2)
    relay = stack.relay()
    load = LoadGenerator([api.base_url], clients=6, seed=1)
    load.start()
    try:
        for crash in range(CRASHES + 1):
            target = load.successes() + PROGRESS_PER_ROUND
            await wait_for(
                lambda: load.successes() >= target,  # noqa: B023 - awaited in this iteration
                timeout=90,
                what=f"{PROGRESS_PER_ROUND} more successful requests (round {crash + 1})",
            )
            if crash == CRASHES:
                break
            await api.kill9()
            api.start()
            await api.wait_ready()
    finally:
        await load.finish()

    print("answers by status:", dict(load.status_counts()))
    assert api.starts == CRASHES + 1
    await assert_clients_got_what_the_database_holds(load, fault_db)
    await stack.check()
    # The relay, untouched by the crashes, delivers every event of the survivors exactly once to
    # each endpoint: the API's fan-out wrote both deliveries in the event's own transaction.
    await assert_every_event_delivered(stack, timeout=120, exactly_once=True)
    assert relay.running() and relay.starts == 1, relay.log_tail()
