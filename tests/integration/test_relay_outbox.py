"""The relay's SQL against a real PostgreSQL: claims, order per (endpoint, payment), tokens,
batched writes, budgets per endpoint."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import asyncpg
import pytest

from outbox_relay import outbox
from outbox_relay.outbox import AttemptRecord, ClaimedEvent
from payment_service.database import connect
from payment_service.deliveries import replay_range
from payment_service.endpoints import insert_endpoint
from tests.support.database import claim, insert_events, set_endpoint_url
from tests.support.waiting import wait_until

LEASE = 30.0
URL = "http://127.0.0.1:9/notifications"  # never called: these tests run the SQL only


@pytest.fixture(autouse=True)
async def notification(conn: asyncpg.Connection) -> int:
    """The endpoint `notification` configured, as the relay's start-up seeding does; its id."""
    return await set_endpoint_url(conn, URL)


def record(event: ClaimedEvent, status: str, **fields: object) -> AttemptRecord:
    values: dict[str, object] = {
        "delay": 0.0,
        "attempted_at": time.time(),
        "status_code": 200,
        "error": None,
        "tries": 1,
        "duration_ms": 3,
    }
    values.update(fields)
    return AttemptRecord(id=event.id, claim_token=event.claim_token, status=status, **values)  # type: ignore[arg-type]


async def test_claim_leases_due_events_oldest_first(conn: asyncpg.Connection) -> None:
    events = await insert_events(conn, payments=5)
    first = await claim(conn, 3, LEASE)
    assert [e.event_id for e in first] == [e.event_id for e in events[:3]]
    assert len({e.claim_token for e in first}) == 1
    row = await conn.fetchrow(
        "SELECT e.payload, d.locked_until - now() AS lease, d.claim_token"
        " FROM deliveries AS d JOIN outbox_events AS e ON e.id = d.event_id"
        " WHERE d.delivery_id = $1",
        first[0].id,
    )
    assert first[0].body == row["payload"].encode()  # the stored jsonb text, byte for byte
    assert json.loads(first[0].body)["event_id"] == first[0].event_id
    assert 29 < row["lease"].total_seconds() <= 30
    assert row["claim_token"] == first[0].claim_token
    second = await claim(conn, 10, LEASE)
    assert [e.event_id for e in second] == [e.event_id for e in events[3:]]
    assert await claim(conn, 10, LEASE) == []


async def test_concurrent_claims_never_overlap(conn: asyncpg.Connection, database_url: str) -> None:
    await insert_events(conn, payments=600)
    conns = [await connect(database_url) for _ in range(8)]
    try:

        async def claim_all(c: asyncpg.Connection) -> list[int]:
            got: list[int] = []
            while batch := await claim(c, 7, LEASE):
                got.extend(e.id for e in batch)
            return got

        results = await asyncio.gather(*(claim_all(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    claimed = [event_id for result in results for event_id in result]
    assert len(claimed) == 600
    assert len(set(claimed)) == 600
    assert sum(1 for result in results if result) > 1  # they really raced


async def test_a_claim_skips_rows_another_transaction_has_locked(
    conn: asyncpg.Connection, database_url: str
) -> None:
    events = await insert_events(conn, payments=4)
    other = await connect(database_url)
    try:
        async with other.transaction():
            await other.execute(
                "SELECT 1 FROM deliveries WHERE event_id = ANY($1) FOR UPDATE",
                [events[0].id, events[1].id],
            )
            claimed = await asyncio.wait_for(claim(conn, 10, LEASE), timeout=5)
            assert [e.event_id for e in claimed] == [events[2].event_id, events[3].event_id]
    finally:
        await other.close()


async def test_only_the_earliest_pending_event_of_a_payment_is_claimable(
    conn: asyncpg.Connection, notification: int
) -> None:
    events = await insert_events(conn, payments=2, events_per_payment=3)
    a1, a2, a3, b1, b2, _b3 = events
    heads = await claim(conn, 10, LEASE)
    assert sorted(e.event_id for e in heads) == sorted([a1.event_id, b1.event_id])
    by_id = {e.event_id: e for e in heads}
    # a1 delivered: a2 becomes claimable, and the write says it unblocked someone
    a1_claim = by_id[a1.event_id]
    written = await outbox.record_attempts(conn, [record(a1_claim, "DELIVERED")])
    assert written == [(a1_claim.id, notification, True)]
    assert [e.event_id for e in await claim(conn, 10, LEASE)] == [a2.event_id]
    # b1 dead: a dead event does not block b2
    await outbox.record_attempts(conn, [record(by_id[b1.event_id], "DEAD", status_code=410)])
    assert [e.event_id for e in await claim(conn, 10, LEASE)] == [b2.event_id]
    # b1 rescheduled instead would have blocked b2: a pending (not due) head still blocks
    await conn.execute(
        "UPDATE deliveries SET status = 'PENDING', locked_until = NULL, claim_token = NULL,"
        " next_attempt_at = now() + interval '1 hour' WHERE event_id = $1",
        a2.id,
    )
    assert await claim(conn, 10, LEASE) == []
    assert a3.id not in {
        r["event_id"]
        for r in await conn.fetch("SELECT event_id FROM deliveries WHERE claim_token IS NOT NULL")
    }


async def test_events_not_due_yet_are_not_claimed(conn: asyncpg.Connection) -> None:
    events = await insert_events(conn, payments=2)
    await conn.execute(
        "UPDATE deliveries SET next_attempt_at = now() + interval '1 minute' WHERE event_id = $1",
        events[0].id,
    )
    assert [e.event_id for e in await claim(conn, 10, LEASE)] == [events[1].event_id]


async def test_an_expired_lease_is_claimed_again_and_the_old_token_writes_nothing(
    conn: asyncpg.Connection, notification: int
) -> None:
    await insert_events(conn, payments=1)
    (old,) = await claim(conn, 1, 0.3)
    assert await claim(conn, 1, LEASE) == []

    async def reclaimed() -> list[ClaimedEvent]:
        return await claim(conn, 1, LEASE)

    (new,) = await wait_until(reclaimed, timeout=5)
    assert new.id == old.id and new.claim_token != old.claim_token
    # the relay that lost its lease cannot write its result, nor release the new claim
    assert await outbox.record_attempts(conn, [record(old, "DELIVERED")]) == []
    assert await outbox.release_claims(conn, [(old.id, old.claim_token)]) == 0
    assert await outbox.record_attempts(conn, [record(new, "DELIVERED")]) == [
        (new.id, notification, False)
    ]
    status = await conn.fetchval("SELECT status FROM deliveries WHERE delivery_id = $1", new.id)
    assert status == "DELIVERED"


async def test_one_batched_write_records_every_outcome(
    conn: asyncpg.Connection, notification: int
) -> None:
    await insert_events(conn, payments=3)
    delivered, rescheduled, dead = await claim(conn, 3, LEASE)
    at = time.time() - 1
    written = await outbox.record_attempts(
        conn,
        [
            record(delivered, "DELIVERED", attempted_at=at, tries=1, duration_ms=4),
            record(
                rescheduled,
                "PENDING",
                delay=60.0,
                attempted_at=at,
                status_code=503,
                error="HTTP 503: busy",
                tries=3,
                duration_ms=250,
            ),
            record(dead, "DEAD", attempted_at=at, status_code=410, error="HTTP 410"),
        ],
    )
    assert sorted(written) == sorted(
        [
            (delivered.id, notification, False),
            (rescheduled.id, notification, False),
            (dead.id, notification, False),
        ]
    )
    rows = {
        r["id"]: r
        for r in await conn.fetch(
            """SELECT delivery_id AS id, status, attempts, delivered_at,
                      extract(epoch FROM next_attempt_at - now()) AS due_in,
                      locked_until, claim_token, last_error, last_status_code,
                      extract(epoch FROM last_attempt_at) AS last_at, attempt_log
                 FROM deliveries"""
        )
    }
    d, r, x = rows[delivered.id], rows[rescheduled.id], rows[dead.id]
    assert (d["status"], r["status"], x["status"]) == ("DELIVERED", "PENDING", "DEAD")
    for row in (d, r, x):
        assert row["attempts"] == 1
        assert row["locked_until"] is None and row["claim_token"] is None
        assert float(row["last_at"]) == pytest.approx(at, abs=0.01)
    assert d["delivered_at"] is not None
    assert r["delivered_at"] is None and x["delivered_at"] is None
    assert 59 < r["due_in"] <= 60
    assert (r["last_status_code"], r["last_error"]) == (503, "HTTP 503: busy")
    assert (x["last_status_code"], x["last_error"]) == (410, "HTTP 410")
    assert d["last_error"] is None
    (entry,) = json.loads(r["attempt_log"])
    assert entry["attempt"] == 1 and entry["outcome"] == "PENDING"
    assert entry["status_code"] == 503 and entry["error"] == "HTTP 503: busy"
    assert entry["tries"] == 3 and entry["duration_ms"] == 250
    # a second attempt appends to the log
    await conn.execute(
        "UPDATE deliveries SET next_attempt_at = now() WHERE delivery_id = $1", rescheduled.id
    )
    (again,) = await claim(conn, 1, LEASE)
    assert again.id == rescheduled.id and again.attempts == 1
    await outbox.record_attempts(conn, [record(again, "DELIVERED")])
    log = json.loads(
        await conn.fetchval("SELECT attempt_log FROM deliveries WHERE delivery_id = $1", again.id)
    )
    assert [(e["attempt"], e["outcome"]) for e in log] == [(1, "PENDING"), (2, "DELIVERED")]


async def test_released_claims_are_due_again_without_an_attempt(conn: asyncpg.Connection) -> None:
    await insert_events(conn, payments=2)
    claimed = await claim(conn, 2, LEASE)
    wrong = [(claimed[0].id, uuid.uuid4())]
    assert await outbox.release_claims(conn, wrong) == 0
    assert await outbox.release_claims(conn, [(e.id, e.claim_token) for e in claimed]) == 2
    again = await claim(conn, 5, LEASE)
    assert [e.id for e in again] == [e.id for e in claimed]
    assert all(e.attempts == 0 for e in again)


async def purge_function_body(conn: asyncpg.Connection) -> str:
    """The statement `purge_expired_idempotency_keys(batch)` runs (db/migrations/0005)."""
    body: str = await conn.fetchval(
        "SELECT prosrc FROM pg_proc WHERE proname = 'purge_expired_idempotency_keys'"
    )
    return body


async def _plan(conn: asyncpg.Connection, sql: str, *args: object) -> str:
    rows = await conn.fetch("EXPLAIN " + sql, *args)
    return "\n".join(r[0] for r in rows)


async def test_the_relays_statements_use_indexes_on_a_large_outbox(
    conn: asyncpg.Connection, notification: int
) -> None:
    """EXPLAIN every statement the relay runs against 30,000 delivered and 300 pending
    deliveries."""
    await insert_events(conn, payments=10_000, events_per_payment=3)
    await conn.execute(
        "UPDATE deliveries SET status = 'DELIVERED', delivered_at = now() - interval '1 day'"
    )
    pending = await insert_events(conn, payments=100, events_per_payment=3)
    await conn.execute(
        """INSERT INTO idempotency_keys (key_hash, request_path, request_fingerprint,
                   response_status, response_data, expires_at)
           SELECT encode(sha256(convert_to(g::text, 'UTF8')), 'hex'), '/payments',
                  repeat('f', 64), 200, '{}', now() + interval '1 day'
             FROM generate_series(1, 20000) AS g"""
    )
    await conn.execute(
        "ANALYZE outbox_events; ANALYZE deliveries; ANALYZE endpoints; ANALYZE idempotency_keys"
    )
    token = uuid.uuid4()
    event_ids = [r[0] for r in await conn.fetch("SELECT id FROM outbox_events LIMIT 1000")]
    delivery_id = await conn.fetchval(
        "SELECT delivery_id FROM deliveries WHERE event_id = $1", pending[0].id
    )
    plans = {
        "claim": await _plan(conn, outbox.CLAIM_SQL, notification, 100, 30.0, token),
        "record": await _plan(
            conn,
            outbox.RECORD_SQL,
            [delivery_id],
            [token],
            ["DELIVERED"],
            [0.0],
            [time.time()],
            [200],
            [None],
            [1],
            [2],
            [True],
        ),
        "probe": await _plan(conn, outbox.PROBE_CLAIM_SQL, notification, 30.0, token),
        "release": await _plan(conn, outbox.RELEASE_SQL, [delivery_id], [token]),
        "gauges": await _plan(conn, outbox.ENDPOINT_BACKLOG_SQL),
        "delete delivered": await _plan(conn, outbox.DELETE_DELIVERED_SQL, 3600.0, 1000),
        "sweep events": await _plan(conn, outbox.SWEEP_EVENTS_SQL, 0, 3600.0, 1000),
        "lock unused events": await _plan(conn, outbox.LOCK_UNUSED_EVENTS_SQL, event_ids, 3600.0),
        "delete unused events": await _plan(conn, outbox.DELETE_UNUSED_EVENTS_SQL, event_ids),
        # the body of the function housekeeping calls (its `batch` is $1 there)
        "delete keys": await _plan(conn, await purge_function_body(conn), 1000),
    }
    # Given a batch of event ids, the planner may hash this small table's deliveries rather than
    # probe them a thousand times; with millions it probes the (event_id, endpoint_id) key.
    hashed_when_small = {"lock unused events", "delete unused events"}
    for name, plan in plans.items():
        if name not in hashed_when_small:
            assert "Seq Scan on deliveries" not in plan, f"{name}:\n{plan}"
        assert "Seq Scan on idempotency_keys" not in plan, f"{name}:\n{plan}"
        assert "Seq Scan on outbox_events" not in plan, f"{name}:\n{plan}"
    assert "deliveries_due_idx" in plans["claim"], plans["claim"]
    # Read in the index's order, not sorted: a sort reads every due delivery of the endpoint on
    # every claim (with 50,000 pending it cost 270 ms a claim and held the relay to 1,700/s).
    assert "Sort" not in plans["claim"], plans["claim"]
    assert "deliveries_pending_aggregate_idx" in plans["claim"], plans["claim"]
    assert "deliveries_pending_aggregate_idx" in plans["record"], plans["record"]
    assert "deliveries_pending_aggregate_idx" in plans["probe"], plans["probe"]
    assert "deliveries_delivered_at_idx" in plans["delete delivered"]
    # Housekeeping's events: a window of the primary key, never a sort of every old event.
    assert "outbox_events_pkey" in plans["sweep events"], plans["sweep events"]
    assert "Sort" not in plans["sweep events"], plans["sweep events"]
    assert "idempotency_keys_expires_at_idx" in plans["delete keys"]
    claimed = await claim(conn, 100, 30)
    assert len(claimed) == 100  # the heads of the 100 payments


async def test_each_endpoint_is_claimed_within_its_own_budget_and_order(
    conn: asyncpg.Connection, notification: int
) -> None:
    """One endpoint's backlog never fills another's claim; order holds per (endpoint, payment)
    only: a delivery waiting at one endpoint does not hold back the same event at another."""
    trip = (await insert_endpoint(conn, name="trip", url="http://127.0.0.1:9/trip")).endpoint_id
    events = await insert_events(conn, payments=50, events_per_payment=2)
    got = await outbox.claim_deliveries(conn, notification, limit=40, lease_seconds=LEASE)
    got += await outbox.claim_deliveries(conn, trip, limit=5, lease_seconds=LEASE)
    per_endpoint = {
        endpoint: [e.event_id for e in got if e.endpoint_id == endpoint]
        for endpoint in (notification, trip)
    }
    firsts = [e.event_id for e in events if e.seq == 1]
    assert per_endpoint[notification] == firsts[:40]  # oldest first, one per payment
    assert per_endpoint[trip] == firsts[:5]  # its own budget, the same events
    # payment 1's first event delivered to trip only: its second may go to trip, not notification
    (trip_head,) = [e for e in got if e.endpoint_id == trip and e.event_id == firsts[0]]
    written = await outbox.record_attempts(conn, [record(trip_head, "DELIVERED")])
    assert written == [(trip_head.id, trip, True)]
    second = next(e.event_id for e in events if e.payment_id == events[0].payment_id and e.seq == 2)
    again = await claim(conn, 100, LEASE)
    assert second in {e.event_id for e in again if e.endpoint_id == trip}
    assert second not in {e.event_id for e in again if e.endpoint_id == notification}
    # a paused endpoint gets nothing, whatever budget the relay's older copy of it asks for
    await conn.execute("UPDATE endpoints SET state = 'PAUSED' WHERE endpoint_id = $1", trip)
    await conn.execute("UPDATE deliveries SET locked_until = NULL, claim_token = NULL")
    paused = await outbox.claim_deliveries(conn, trip, limit=100, lease_seconds=LEASE)
    assert paused == []


async def test_order_per_payment_follows_the_events_even_when_a_replay_adds_an_older_one_later(
    conn: asyncpg.Connection,
) -> None:
    """`outbox replay --since` gives an endpoint a delivery for an older event after a newer
    event's delivery of the same payment is already pending: the older event still goes first."""
    started = await conn.fetchval("SELECT now()")
    first, second = await insert_events(conn, payments=1, events_per_payment=2)
    # the endpoint never had the first event (as if it was DISABLED when it was written)
    await conn.execute("DELETE FROM deliveries WHERE event_id = $1", first.id)
    done = await replay_range(conn, endpoint="notification", since=started, until=None)
    assert (done.added, done.again) == (1, 1)
    ids = dict(await conn.fetch("SELECT event_id, delivery_id FROM deliveries"))
    assert ids[first.id] > ids[second.id]  # the older event's delivery is the newer row
    claimed = await claim(conn, 10, LEASE)
    assert [e.event_id for e in claimed] == [first.event_id]
    [written] = await outbox.record_attempts(conn, [record(claimed[0], "DELIVERED")])
    assert written.unblocks  # the later event was waiting for it
    assert [e.event_id for e in await claim(conn, 10, LEASE)] == [second.event_id]


async def test_an_open_breaker_is_never_claimed_and_a_probe_takes_the_head_due_or_not(
    conn: asyncpg.Connection, notification: int
) -> None:
    events = await insert_events(conn, payments=2, events_per_payment=2)
    await conn.execute(
        "UPDATE endpoints SET breaker_open_until = now() + interval '1 minute'"
        " WHERE endpoint_id = $1",
        notification,
    )
    # due now, but the breaker is open: a relay whose copy of the endpoint still says closed
    # claims nothing
    assert await claim(conn, 10, LEASE) == []
    # every delivery waits out a backoff: the probe goes anyway
    await conn.execute("UPDATE deliveries SET next_attempt_at = now() + interval '1 hour'")
    probe = await outbox.claim_probe(conn, notification, lease_seconds=LEASE)
    assert probe is not None and probe.event_id == events[0].event_id
    assert not probe.counted
    # one delivery per payment at most: the next head is the other payment's first event
    other = await outbox.claim_probe(conn, notification, lease_seconds=LEASE)
    assert other is not None and other.event_id == events[2].event_id
    assert await outbox.claim_probe(conn, notification, lease_seconds=LEASE) is None


async def test_a_claim_whose_answer_was_lost_is_released_by_its_token(
    conn: asyncpg.Connection, notification: int
) -> None:
    # Two claims; the answer of the first never reaches the relay (the connection broke after
    # the commit). Releasing its token frees exactly its leases, not the other claim's.
    await insert_events(conn, payments=3)
    lost, kept = uuid.uuid4(), uuid.uuid4()
    taken = await outbox.claim_deliveries(
        conn, notification, limit=2, lease_seconds=LEASE, token=lost
    )
    assert {e.claim_token for e in taken} == {lost} and len(taken) == 2
    other = await outbox.claim_deliveries(
        conn, notification, limit=5, lease_seconds=LEASE, token=kept
    )
    assert len(other) == 1

    assert await outbox.release_claim_tokens(conn, [lost]) == 2

    again = await claim(conn, 5, LEASE)
    assert sorted(e.id for e in again) == sorted(e.id for e in taken)
    assert (
        await conn.fetchval(
            "SELECT claim_token FROM deliveries WHERE delivery_id = $1", other[0].id
        )
        == kept
    )


async def test_an_attempt_written_before_its_answer_was_lost_is_recognised(
    conn: asyncpg.Connection,
) -> None:
    # The recorder's write committed but its answer was lost; written again, the claim token no
    # longer matches. The attempt is found on its row: the relay's own, not another relay's.
    await insert_events(conn, payments=2)
    first, second = await claim(conn, 5, LEASE)
    written_before = record(first, "DELIVERED")
    assert [w.id for w in await outbox.record_attempts(conn, [written_before])] == [first.id]

    retried = await outbox.record_attempts(conn, [written_before, record(second, "DELIVERED")])

    assert [w.id for w in retried] == [second.id]
    assert await outbox.recorded_already(conn, [written_before]) == ({first.id}, set())
    someone_elses = record(first, "DELIVERED", attempted_at=written_before.attempted_at - 1)
    assert await outbox.recorded_already(conn, [someone_elses]) == (set(), set())
    assert (
        await conn.fetchval("SELECT attempts FROM deliveries WHERE delivery_id = $1", first.id) == 1
    )
