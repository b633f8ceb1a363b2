"""Scale-out on one PostgreSQL: 2 API processes and 3 relays, all stateless.

The clients send each attempt of a request to the next API process, so a retry may land on the
other one. Midway, notification's receiver holds every callback unanswered until all three relays
have one in flight at the same moment — proof that the three deliver side by side rather than one
doing everything — then lets them go. Every event is acknowledged exactly once at each of the two
endpoints (two relays never acknowledge one delivery twice), nothing is sent twice except the held
requests the relays saw fail, and `payment-service check` passes.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest

from tests.faults.harness import (
    LoadGenerator,
    ServiceStack,
    assert_clients_got_what_the_database_holds,
    assert_every_event_delivered,
    connections_by_process,
    socket_owner,
)
from tests.support.database import FaultDatabase
from tests.support.receiver import Receiver
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

RELAYS = 3
OPERATIONS = 150


async def test_two_apis_and_three_relays_deliver_every_event_exactly_once(
    stack: ServiceStack, fault_db: FaultDatabase, receiver: Receiver
) -> None:
    apis = [await stack.api(f"api-{n}", workers=1) for n in (1, 2)]
    # Each relay holds at most concurrency + batch deliveries per endpoint, so held deliveries
    # cannot all go to one relay: the rest stay claimable by the others.
    relays = {
        f"relay-{n}": stack.relay(f"relay-{n}", relay_batch_size=4, relay_concurrency=4)
        for n in range(1, RELAYS + 1)
    }
    for each in stack.endpoints.values():
        each.owner_of = functools.partial(
            socket_owner,
            server_port=each.port,
            processes={name: relay.pid for name, relay in relays.items()},
        )
    load = LoadGenerator([api.base_url for api in apis], clients=6, seed=5)
    load.start()
    try:
        await wait_for(lambda: load.successes() >= 30, timeout=90, what="the load")
        receiver.hold()

        def relays_in_flight() -> set[str | None]:
            return {d.origin for d in receiver.deliveries if d.stalled and not d.finished}

        await wait_for(
            lambda: relays_in_flight() >= set(relays),
            timeout=90,
            what="a delivery in flight from every relay at once",
        )
        # Everything is busy now: what each process holds is its connection budget in use.
        processes = {name: p.pid for name, p in relays.items()}
        processes.update({api.name: api.pid for api in apis})
        held = await connections_by_process(fault_db, processes)
        print(f"database connections with every process busy: {dict(sorted(held.items()))}")
        receiver.release()
        await wait_for(lambda: load.successes() >= OPERATIONS, timeout=120, what="the load")
    finally:
        await load.finish()

    await assert_clients_got_what_the_database_holds(load, fault_db)
    events = await assert_every_event_delivered(stack, timeout=120, exactly_once=True)
    for name, each in stack.endpoints.items():
        unheld = [d for d in each.deliveries if not d.stalled]
        assert len(unheld) == len(events), f"{name}: {len(unheld)} callbacks, {len(events)} events"
        assert {d.origin for d in each.deliveries} <= set(relays), name
        share = Counter(d.origin for d in unheld)
        print(f"{name}: {len(events)} events acknowledged once each; by relay: {dict(share)}")
    await stack.check()
    for process in [*apis, *relays.values()]:
        assert process.running() and process.starts == 1, process.log_tail()
