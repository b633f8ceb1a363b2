"""Relay processes crashing, stopping and running side by side.

- kill -9 in the middle of a large batch, then a new relay: everything delivered; duplicates only
  of events the dead relay had claimed, with the same webhook-id and body;
- two and four relays at once on 2,000 events: each delivered exactly once;
- SIGTERM during delivery: exit 0 within the grace period, nothing lost, claims released.
"""

from __future__ import annotations

import asyncio
import signal
import time

import asyncpg
import pytest

from tests.support.database import DELIVERY_ROWS, claims_outstanding, insert_events, status_counts
from tests.support.processes import RelayLauncher, dump_logs
from tests.support.receiver import OK, Delivery, Receiver, Reply, assert_ordered_per_payment
from tests.support.waiting import wait_until


def slow(seconds: float):  # type: ignore[no-untyped-def]
    async def policy(_d: Delivery) -> Reply:
        await asyncio.sleep(seconds)
        return OK

    return policy


async def delivered_count(conn: asyncpg.Connection) -> int:
    return (await status_counts(conn)).get("DELIVERED", 0)


async def test_kill_9_mid_batch_then_a_new_relay_delivers_everything(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    receiver.policy = slow(0.02)
    events = await insert_events(conn, payments=1000, events_per_payment=2)
    ids = {e.event_id for e in events}
    first = relays.start(relay_lease_seconds=2)
    await wait_until(lambda: len(receiver.accepted()) >= 300, timeout=60)
    first.send(signal.SIGKILL)
    assert await first.wait_exit(timeout=10) == -signal.SIGKILL
    killed_at = len(receiver.deliveries)
    # What the dead relay still held: claimed, maybe sent, result never written.
    held = {
        r[0]
        for r in await conn.fetch(
            f"SELECT event_id::text FROM {DELIVERY_ROWS} WHERE claim_token IS NOT NULL"
        )
    }
    assert held, "the relay was killed between batches; nothing was in flight"
    assert len(receiver.accepted_ids()) < len(ids)

    relays.start()
    await wait_until(lambda: ids <= receiver.accepted_ids(), timeout=120)
    await wait_until(lambda: _count_is(conn, len(ids)), timeout=20)
    counts = receiver.accepted_counts()
    duplicates = {event_id for event_id, n in counts.items() if n > 1}
    assert duplicates <= held, "an event that was not in flight was delivered twice"
    for event_id in duplicates:
        copies = [d for d in receiver.accepted() if d.webhook_id == event_id]
        assert copies[0].seq < killed_at  # the first copy came from the killed relay
        assert len({d.body for d in copies}) == 1  # same event, same webhook-id, same body
        assert all(d.verify()["event_id"] == event_id for d in copies)
    assert max(counts.values()) <= 2
    assert_ordered_per_payment(receiver, events)


async def _count_is(conn: asyncpg.Connection, count: int) -> bool:
    return await delivered_count(conn) == count


@pytest.mark.parametrize("relay_count", [2, 4])
async def test_several_relays_at_once_deliver_each_event_exactly_once(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher, relay_count: int
) -> None:
    started = [relays.start(relay_batch_size=50) for _ in range(relay_count)]
    await wait_until(lambda: all(r.logged("listening for new events") for r in started), timeout=60)
    events = await insert_events(conn, payments=1000, events_per_payment=2)
    ids = {e.event_id for e in events}
    await wait_until(lambda: ids <= receiver.accepted_ids(), timeout=120)
    await wait_until(lambda: _count_is(conn, len(ids)), timeout=20)
    assert len(receiver.deliveries) == len(ids)  # not one extra request
    assert set(receiver.accepted_counts().values()) == {1}
    assert_ordered_per_payment(receiver, events)
    for relay in started:
        relay.send(signal.SIGTERM)
    assert [await r.wait_exit(timeout=20) for r in started] == [0] * relay_count
    delivered_by = [_delivered_by(relay.log_records()) for relay in started]
    assert sum(delivered_by) == len(ids), dump_logs(started)
    assert sum(1 for n in delivered_by if n) >= 2, delivered_by  # the work was really shared


def _delivered_by(records: list[dict[str, object]]) -> int:
    (stopped,) = [r for r in records if r.get("msg") == "relay stopped"]
    outcomes = stopped["outcomes"]
    assert isinstance(outcomes, dict)
    return int(outcomes.get("DELIVERED", 0))


async def test_sigterm_during_delivery_exits_0_within_grace_and_loses_nothing(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    receiver.policy = slow(0.3)
    grace = 3.0
    relay = relays.start(relay_concurrency=4, relay_shutdown_grace_seconds=grace)
    events = await insert_events(conn, payments=100)
    ids = {e.event_id for e in events}
    await wait_until(lambda: len(receiver.accepted()) >= 8, timeout=60)
    signalled = time.monotonic()
    relay.send(signal.SIGTERM)
    assert await relay.wait_exit(timeout=grace + 10) == 0, dump_logs([relay])
    assert time.monotonic() - signalled < grace + 1.5
    assert await claims_outstanding(conn) == 0  # every claim written back or released
    # every request the receiver got was answered, and every answered event was recorded
    assert all(d.status == 200 for d in receiver.deliveries)
    assert await delivered_count(conn) == len(receiver.accepted_ids())
    assert len(receiver.accepted_ids()) < len(ids)
    attempts = await conn.fetchval(
        f"SELECT max(attempts) FROM {DELIVERY_ROWS} WHERE status = 'PENDING'"
    )
    assert attempts == 0  # released events were not counted as attempts

    receiver.policy = slow(0)
    relays.start()
    await wait_until(lambda: ids <= receiver.accepted_ids(), timeout=60)
    assert set(receiver.accepted_counts().values()) == {1}  # a clean stop sends nothing twice
    await wait_until(lambda: _count_is(conn, len(ids)), timeout=20)


async def test_sigterm_with_a_hanging_receiver_releases_the_claims_at_the_grace_deadline(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    receiver.policy = slow(60)
    grace = 1.0
    relay = relays.start(
        relay_concurrency=4, relay_shutdown_grace_seconds=grace, relay_request_timeout=30
    )
    events = await insert_events(conn, payments=10)
    await wait_until(lambda: len(receiver.deliveries) >= 4, timeout=30)
    signalled = time.monotonic()
    relay.send(signal.SIGTERM)
    assert await relay.wait_exit(timeout=grace + 10) == 0, dump_logs([relay])
    assert time.monotonic() - signalled < grace + 1.5
    assert await claims_outstanding(conn) == 0
    assert await conn.fetchval(f"SELECT max(attempts) FROM {DELIVERY_ROWS}") == 0
    assert await relay_logged_release(relay)

    receiver.policy = slow(0)
    relays.start()
    await wait_until(lambda: {e.event_id for e in events} <= receiver.accepted_ids(), timeout=30)
    await wait_until(lambda: _count_is(conn, len(events)), timeout=20)


async def relay_logged_release(relay) -> bool:  # type: ignore[no-untyped-def]
    (stopped,) = [r for r in relay.log_records() if r.get("msg") == "relay stopped"]
    return bool(stopped["outcomes"].get("RELEASED"))


async def test_a_crashing_loop_is_logged_and_restarted_after_a_delay(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    relay = relays.start()
    await wait_until(lambda: relay.logged("listening for new events"), timeout=30)
    # Break the claim statement with an error that is no database outage: a bug, as it were.
    await conn.execute("ALTER TABLE deliveries RENAME COLUMN claim_token TO claim_token_gone")
    events = await insert_events(conn, payments=5)
    crashed = "relay loop crashed; it restarts after a delay"
    await wait_until(lambda: relay.logged(crashed) >= 2, timeout=30)
    assert receiver.deliveries == []
    record = next(r for r in relay.log_records() if r.get("msg") == crashed)
    assert record["loop"] == "claimer" and record["level"] == "ERROR"
    assert "UndefinedColumnError" in record["exc"]  # the traceback is logged

    await conn.execute("ALTER TABLE deliveries RENAME COLUMN claim_token_gone TO claim_token")
    await wait_until(lambda: {e.event_id for e in events} <= receiver.accepted_ids(), timeout=30)
    await wait_until(lambda: _count_is(conn, len(events)), timeout=20)
    assert relay.process is not None and relay.process.poll() is None
