"""Relay processes delivering to a real receiver: signatures, order, failures, dead events, replay.

Every relay here is a real `python -m outbox_relay` process; events are rows written the way the
API writes them (payload = payment_event_json, then NOTIFY).
"""

from __future__ import annotations

import asyncio
import json
import random

import asyncpg
import pytest

from tests.support.commands import outbox_command
from tests.support.database import DELIVERY_ROWS, insert_events, status_counts
from tests.support.processes import RelayLauncher, dump_logs
from tests.support.receiver import (
    OK,
    Delivery,
    Receiver,
    Reply,
    answer_status,
    assert_ordered_per_payment,
)
from tests.support.waiting import wait_until


async def all_accepted(receiver: Receiver, event_ids: set[str], timeout: float = 60) -> None:
    await wait_until(lambda: event_ids <= receiver.accepted_ids(), timeout=timeout)


async def test_every_event_is_delivered_once_signed_with_its_stored_payload(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    relay = relays.start()
    events = await insert_events(conn, payments=60, events_per_payment=3)
    ids = {e.event_id for e in events}
    await all_accepted(receiver, ids)
    stored = {
        r["event_id"]: r["payload"]
        for r in await conn.fetch("SELECT event_id::text, payload FROM outbox_events")
    }
    for delivery in receiver.deliveries:
        payload = delivery.verify()  # the standardwebhooks package verifies the signature
        assert delivery.webhook_id == payload["event_id"]
        assert delivery.headers["idempotency-key"] == delivery.webhook_id
        assert delivery.headers["content-type"] == "application/json"
        assert delivery.body == stored[delivery.webhook_id].encode()  # byte for byte
    assert receiver.accepted_counts() == {event_id: 1 for event_id in ids}  # no duplicates
    await wait_until(lambda: _all_delivered(conn, len(ids)), timeout=10)
    rows = await conn.fetch(
        "SELECT attempts, delivered_at, last_status_code, last_error, attempt_log,"
        f" claim_token, locked_until FROM {DELIVERY_ROWS}"
    )
    for row in rows:
        assert (row["attempts"], row["last_status_code"], row["last_error"]) == (1, 200, None)
        assert row["delivered_at"] is not None
        assert row["claim_token"] is None and row["locked_until"] is None
        (entry,) = json.loads(row["attempt_log"])
        assert entry["outcome"] == "DELIVERED" and entry["status_code"] == 200
    assert_ordered_per_payment(receiver, events)
    assert relay.process is not None and relay.process.poll() is None, dump_logs([relay])


async def _all_delivered(conn: asyncpg.Connection, count: int) -> bool:
    return (await status_counts(conn)).get("DELIVERED", 0) == count


async def test_order_per_payment_holds_while_the_receiver_fails_some(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    rng = random.Random(20240601)

    async def unreliable(_d: Delivery) -> Reply:
        return Reply(500) if rng.random() < 0.3 else OK

    receiver.policy = unreliable
    relays.start(relay_quick_retries=0, relay_retry_schedule="0.05", relay_concurrency=16)
    events = await insert_events(conn, payments=40, events_per_payment=4)
    await all_accepted(receiver, {e.event_id for e in events})
    assert sum(1 for d in receiver.deliveries if d.status == 500) > 20  # failures really happened
    assert_ordered_per_payment(receiver, events)
    await wait_until(lambda: _all_delivered(conn, len(events)), timeout=10)


async def _fail_while(receiver: Receiver, mode: str) -> None:
    """Make the receiver fail in the given way."""
    if mode == "500":
        receiver.policy = answer_status(500)
    elif mode == "timeout":

        async def hang(_d: Delivery) -> Reply:
            await asyncio.sleep(5)
            return OK

        receiver.policy = hang
    else:
        await receiver.stop_listening()


@pytest.mark.parametrize("mode", ["500", "timeout", "refused"])
async def test_a_receiver_that_fails_for_a_while_gets_everything_afterwards(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher, mode: str
) -> None:
    await _fail_while(receiver, mode)
    relay = relays.start(relay_request_timeout=0.3, relay_retry_schedule="0.2,0.4")
    events = await insert_events(conn, payments=20)

    async def failed_attempts() -> bool:
        return bool(
            await conn.fetchval(
                f"SELECT count(*) >= 20 FROM {DELIVERY_ROWS}"
                " WHERE attempts >= 2 AND status = 'PENDING'"
            )
        )

    await wait_until(failed_attempts, timeout=30)
    errors = {r[0] for r in await conn.fetch(f"SELECT DISTINCT last_error FROM {DELIVERY_ROWS}")}
    expected = {"500": "HTTP 500", "timeout": "timeout", "refused": "connection error"}[mode]
    assert all(error and error.startswith(expected) for error in errors), errors
    if mode == "refused":
        await receiver.listen_again()
    receiver.policy = answer_status(200)
    await all_accepted(receiver, {e.event_id for e in events}, timeout=30)
    await wait_until(lambda: _all_delivered(conn, len(events)), timeout=10)
    assert relay.process is not None and relay.process.poll() is None, dump_logs([relay])


async def test_410_gone_makes_an_event_dead_at_once(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    receiver.policy = answer_status(410)
    relays.start()
    events = await insert_events(conn, payments=5)

    async def dead() -> bool:
        return (await status_counts(conn)).get("DEAD", 0) == 5

    await wait_until(dead, timeout=30)
    assert [len(receiver.requests_for(e.event_id)) for e in events] == [1] * 5
    rows = await conn.fetch(f"SELECT attempts, last_status_code, last_error FROM {DELIVERY_ROWS}")
    assert {(r["attempts"], r["last_status_code"]) for r in rows} == {(1, 410)}


async def test_max_attempts_makes_an_event_dead_and_replay_delivers_it(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher, database_url: str
) -> None:
    receiver.policy = answer_status(503)
    relays.start(relay_max_attempts=3, relay_quick_retries=0, relay_retry_schedule="0.05")
    events = await insert_events(conn, payments=4)

    async def dead() -> bool:
        return (await status_counts(conn)).get("DEAD", 0) == 4

    await wait_until(dead, timeout=30)
    assert [len(receiver.requests_for(e.event_id)) for e in events] == [3] * 4
    for row in await conn.fetch(f"SELECT attempts, attempt_log FROM {DELIVERY_ROWS}"):
        log = json.loads(row["attempt_log"])
        assert row["attempts"] == 3
        assert [(e["attempt"], e["outcome"], e["status_code"]) for e in log] == [
            (1, "PENDING", 503),
            (2, "PENDING", 503),
            (3, "DEAD", 503),
        ]

    listed = outbox_command(database_url, "dead", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(e["event_id"] for e in json.loads(listed.stdout)) == sorted(
        e.event_id for e in events
    )
    receiver.policy = answer_status(200)
    replay = outbox_command(database_url, "replay", "--dead")
    assert (replay.returncode, replay.stdout.strip()) == (
        0,
        "replayed 4 delivery(ies) to notification",
    ), replay.stderr
    await all_accepted(receiver, {e.event_id for e in events}, timeout=30)
    await wait_until(lambda: _all_delivered(conn, 4), timeout=10)
