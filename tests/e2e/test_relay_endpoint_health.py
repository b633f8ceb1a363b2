"""Endpoint health end to end: real relay processes, real receivers on 127.0.0.1, a
real PostgreSQL. The breaker opens after N failed attempts, probes after its cooldown and closes on
success, and nothing becomes DEAD meanwhile; 410 Gone disables the endpoint and `enable` sends
everything, in order; a PAUSED endpoint gets nothing until resumed; the relay logs every change
and shows each endpoint's breaker and state in its metrics."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from payment_service.embedded import free_port
from payment_service.endpoints import select_endpoint, set_state
from tests.support.database import (
    DELIVERY_ROWS,
    EventRow,
    insert_events,
    recorded,
    status_counts,
)
from tests.support.processes import RelayLauncher, RelayProcess, dump_logs
from tests.support.receiver import (
    Answer,
    Delivery,
    Receiver,
    Reply,
    answer_ok,
    answer_status,
    assert_ordered_per_payment,
    subscribed,
)
from tests.support.waiting import wait_for


def start_relay(relays: RelayLauncher, **overrides: object) -> RelayProcess:
    """A relay with small health settings: the breaker opens after 3 failed attempts and first
    cools down for 1 s; no quick retries, so each request is one attempt."""
    settings: dict[str, object] = {
        "endpoint_breaker_failures": 3,
        "endpoint_breaker_cooldown_seconds": 1,
        "relay_quick_retries": 0,
        **overrides,
    }
    return relays.start(command=None, **settings)


def changes(relay: RelayProcess, kind: str) -> list[str]:
    """The `to` of each endpoint change of `kind` (breaker, state) the relay made, in order."""
    return [r["to"] for r in relay.log_records() if r.get("msg") == f"endpoint {kind} changed"]


def seen(relay: RelayProcess) -> list[tuple[str, str]]:
    """(state, breaker) of each endpoint change the relay saw when reloading its endpoints."""
    return [
        (r["state"], r["breaker"])
        for r in relay.log_records()
        if r.get("msg") == "endpoint health seen"
    ]


def everything_at(receiver: Receiver, events: list[EventRow]) -> bool:
    return {e.event_id for e in events} <= receiver.accepted_ids()


async def metric(port: int, series: str) -> float | None:
    """One series' value from the relay's /metrics (None while it is not there)."""
    async with httpx.AsyncClient(trust_env=False) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return None if found is None else float(found.group(1))


async def test_the_breaker_opens_probes_after_its_cooldown_and_closes_and_nothing_dies(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    receiver.policy = answer_status(503)
    port = free_port()
    relay = start_relay(
        relays, relay_max_attempts=4, relay_retry_schedule="0.2", relay_metrics_port=port
    )
    # one payment: every attempt goes to its first event (order), so its attempts pile up
    events = await insert_events(conn, payments=1, events_per_payment=3)
    await wait_for(lambda: "open" in changes(relay, "breaker"), timeout=30, what="breaker open")
    breaker = 'outbox_endpoint_breaker_state{endpoint="notification"}'

    async def breaker_not_closed() -> bool:
        return await metric(port, breaker) in (1.0, 2.0)

    await wait_for(breaker_not_closed, timeout=20, what="the breaker gauge to leave closed")
    # two failed probes, one per cooldown (1 s, then 2 s): attempts beyond RELAY_MAX_ATTEMPTS

    async def head() -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"SELECT status, attempts, counted_attempts FROM {DELIVERY_ROWS}"
            " WHERE event_id = $1::uuid AND attempts >= 5",
            events[0].event_id,
        )

    first = await wait_for(head, timeout=30, what="two probes recorded")
    assert (first["status"], first["counted_attempts"]) == ("PENDING", 3), dict(first)
    assert relay.logged("probing endpoint") >= 2
    assert "DEAD" not in await status_counts(conn), dump_logs([relay])
    assert {d.webhook_id for d in receiver.deliveries} == {events[0].event_id}  # order held
    assert await metric(port, 'outbox_endpoint_state{endpoint="notification",state="ACTIVE"}') == 1
    assert await metric(port, 'outbox_endpoint_pending_deliveries{endpoint="notification"}') == 3
    opened = 'relay_endpoint_state_changes_total{endpoint="notification",to="open"}'
    assert (await metric(port, opened) or 0) >= 2  # opened, then reopened by a failed probe

    receiver.policy = answer_ok
    await wait_for(lambda: everything_at(receiver, events), timeout=30, what="every event")
    assert_ordered_per_payment(receiver, events)
    await recorded(conn, {"DELIVERED": 3})
    breakers = changes(relay, "breaker")
    assert breakers[:3] == ["open", "half_open", "open"] and breakers[-1] == "closed", breakers

    async def breaker_closed() -> bool:
        return await metric(port, breaker) == 0.0

    await wait_for(breaker_closed, timeout=20, what="the breaker gauge back at closed")
    assert ("ACTIVE", "open") in seen(relay) and ("ACTIVE", "closed") in seen(relay)


async def test_410_disables_the_endpoint_and_enable_delivers_everything_in_order(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    answers = iter([503] * 3)  # three failed attempts, then 410 Gone

    async def failing_then_gone(_delivery: Delivery) -> Answer:
        return Reply(next(answers, 410), b'{"error": "test"}')

    receiver.policy = failing_then_gone
    # a long backoff: only `enable` making the waiting deliveries due gets them out in time
    relay = start_relay(relays, relay_retry_schedule="120", relay_max_attempts=2)
    events = await insert_events(conn, payments=5, events_per_payment=2)

    async def disabled() -> bool:
        return (await select_endpoint(conn, "notification")).state == "DISABLED"

    await wait_for(disabled, timeout=30, what="the endpoint DISABLED by a 410")
    assert (await select_endpoint(conn, "notification")).state_reason == (
        "the endpoint answered 410 Gone"
    )
    assert await status_counts(conn) == {"PENDING": 10}  # kept, nothing DEAD
    gone = await conn.fetch(
        f"SELECT counted_attempts FROM {DELIVERY_ROWS} WHERE last_status_code = 410"
    )
    assert gone and all(r["counted_attempts"] == 0 for r in gone)  # a 410 never counts
    await wait_for(
        lambda: (
            "DISABLED" in changes(relay, "state")
            and relay.logged("no longer delivering to endpoint") >= 1
        ),
        timeout=10,
        what="the relay to log the change and stop delivering",
    )

    receiver.policy = answer_ok
    await set_state(conn, "notification", "ACTIVE")  # = `endpoints enable notification`
    await wait_for(lambda: everything_at(receiver, events), timeout=30, what="every event")
    assert_ordered_per_payment(receiver, events)
    await recorded(conn, {"DELIVERED": 10})
    assert receiver.accepted_counts() == {e.event_id: 1 for e in events}
    await wait_for(
        lambda: ("ACTIVE", "closed") in seen(relay), timeout=10, what="the relay to see enable"
    )
    assert any(state == "DISABLED" for state, _breaker in seen(relay))


@pytest.fixture
async def trip(conn: asyncpg.Connection) -> AsyncIterator[Receiver]:
    """A second endpoint that stays ACTIVE: the yardstick for 'nothing arrived meanwhile'."""
    async with subscribed(conn, "trip") as receiver:
        yield receiver


async def test_a_paused_endpoint_receives_nothing_until_resumed_then_everything_in_order(
    conn: asyncpg.Connection, receiver: Receiver, trip: Receiver, relays: RelayLauncher
) -> None:
    relay = start_relay(relays)
    await wait_for(
        lambda: relay.logged("delivering to endpoint") == 2, timeout=60, what="both endpoints"
    )
    await set_state(conn, "notification", "PAUSED", reason="maintenance")
    await wait_for(
        lambda: (
            relay.logged("no longer delivering to endpoint") == 1
            and ("PAUSED", "closed") in seen(relay)
        ),
        timeout=10,
        what="the relay to see the pause",
    )
    events = await insert_events(conn, payments=10, events_per_payment=3)
    # trip gets everything while notification, paused, gets nothing
    await wait_for(lambda: everything_at(trip, events), timeout=30, what="trip's events")
    assert receiver.deliveries == []
    assert await status_counts(conn, "notification") == {"PENDING": 30}

    await set_state(conn, "notification", "ACTIVE")  # = `endpoints resume notification`
    await wait_for(lambda: everything_at(receiver, events), timeout=30, what="every event")
    assert_ordered_per_payment(receiver, events)
    await recorded(conn, {"DELIVERED": 30}, "notification")
    assert ("ACTIVE", "closed") in seen(relay)
