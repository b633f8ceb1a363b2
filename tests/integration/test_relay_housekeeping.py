"""Housekeeping removes only deliveries delivered past retention, events past retention that no
delivery needs any more, and expired idempotency keys; a pass goes on while it finds work, and
stops when the relay stops."""

from __future__ import annotations

import asyncio

import asyncpg

from outbox_relay.housekeeping import BATCH_SIZE, housekeep
from outbox_relay.metrics import RelayMetrics
from outbox_relay.outbox import HOUSEKEEPING_LOCK_ID
from outbox_relay.state import RelayState
from outbox_relay.timers import housekeeping_loop
from payment_service.config import Settings
from payment_service.database import connect, create_pool
from tests.support.database import insert_events, waiting_for_a_lock
from tests.support.waiting import wait_for


async def arrange(conn: asyncpg.Connection) -> dict[str, list[int]]:
    """Events (each with its delivery to `notification`) and keys of every kind, old and new;
    the event ids that must go and must stay."""
    events = await insert_events(conn, payments=12)
    ids = [e.id for e in events]
    old_delivered, new_delivered, old_pending, old_dead = ids[:5], ids[5:8], ids[8:10], ids[10:]
    await conn.execute(
        "UPDATE deliveries SET status = 'DELIVERED', delivered_at = now() - interval '200 hours'"
        " WHERE event_id = ANY($1)",
        old_delivered,
    )
    # delivered late: the event is past retention, its delivery not yet, so both stay
    await conn.execute(
        "UPDATE deliveries SET status = 'DELIVERED', delivered_at = now() - interval '100 hours'"
        " WHERE event_id = ANY($1)",
        new_delivered,
    )
    await conn.execute(
        "UPDATE outbox_events SET created_at = now() - interval '400 hours' WHERE id = ANY($1)",
        old_delivered + new_delivered + old_pending + old_dead,
    )
    await conn.execute("UPDATE deliveries SET status = 'DEAD' WHERE event_id = ANY($1)", old_dead)
    await conn.execute(
        """INSERT INTO idempotency_keys (key_hash, request_path, request_fingerprint,
                   response_status, response_data, created_at, expires_at)
           SELECT encode(sha256(convert_to(g::text, 'UTF8')), 'hex'), '/payments',
                  repeat('f', 64), 200, '{}', now() - interval '2 days',
                  CASE WHEN g <= 7 THEN now() - interval '1 second'
                       ELSE now() + interval '1 hour' END
             FROM generate_series(1, 10) AS g"""
    )
    return {"gone": old_delivered, "kept": new_delivered + old_pending + old_dead}


async def test_only_old_delivered_events_and_expired_keys_are_deleted(
    conn: asyncpg.Connection,
) -> None:
    ids = await arrange(conn)
    result = await housekeep(conn, retention_hours=168, batch_size=2)  # batches of 2: 3 rounds
    assert (result.ran, result.deliveries_deleted, result.events_deleted) == (True, 5, 5)
    assert result.keys_deleted == 7
    left = {r["id"] for r in await conn.fetch("SELECT id FROM outbox_events")}
    assert left == set(ids["kept"])
    kept_deliveries = {r[0] for r in await conn.fetch("SELECT event_id FROM deliveries")}
    assert kept_deliveries == set(ids["kept"])
    keys_left = await conn.fetchval(
        "SELECT count(*) FROM idempotency_keys WHERE expires_at > now()"
    )
    assert keys_left == 3
    assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 3
    # payments are never touched
    assert await conn.fetchval("SELECT count(*) FROM payments") == 12
    again = await housekeep(conn, retention_hours=168)
    assert (again.deliveries_deleted, again.events_deleted, again.keys_deleted) == (0, 0, 0)


async def test_the_gateways_old_webhooks_are_deleted_in_batches(conn: asyncpg.Connection) -> None:
    """Webhooks received past GATEWAY_EVENTS_RETENTION_DAYS go, in batches; newer ones stay, and
    without a retention none is touched."""
    await conn.execute(
        """INSERT INTO gateway_events
                  (event_id, gateway_type, outcome, created_at, received_at)
           SELECT 'evt_' || g, 'payment_intent.succeeded', 'not_ours',
                  now() - make_interval(days => CASE WHEN g <= 7 THEN 31 ELSE 29 END),
                  now() - make_interval(days => CASE WHEN g <= 7 THEN 31 ELSE 29 END)
             FROM generate_series(1, 10) AS g"""
    )
    untouched = await housekeep(conn, retention_hours=168, batch_size=2)
    assert untouched.gateway_events_deleted == 0
    assert await conn.fetchval("SELECT count(*) FROM gateway_events") == 10

    result = await housekeep(
        conn, retention_hours=168, gateway_events_retention_days=30, batch_size=2
    )
    assert result.gateway_events_deleted == 7
    assert result.rounds == 4  # batches of 2: 2, 2, 2, 1
    left = {r[0] for r in await conn.fetch("SELECT event_id FROM gateway_events")}
    assert left == {"evt_8", "evt_9", "evt_10"}
    again = await housekeep(conn, retention_hours=168, gateway_events_retention_days=30)
    assert again.gateway_events_deleted == 0


async def test_retention_zero_deletes_every_delivered_event(conn: asyncpg.Connection) -> None:
    ids = await arrange(conn)
    result = await housekeep(conn, retention_hours=0)
    assert (result.deliveries_deleted, result.events_deleted) == (8, 8)
    left = {r["id"] for r in await conn.fetch("SELECT id FROM outbox_events")}
    assert left == set(ids["kept"]) - set(ids["kept"][:3])


async def test_one_relay_at_a_time(conn: asyncpg.Connection, database_url: str) -> None:
    await arrange(conn)
    other = await connect(database_url)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", HOUSEKEEPING_LOCK_ID)
        skipped = await housekeep(conn, retention_hours=168)
        assert not skipped.ran
        assert await conn.fetchval("SELECT count(*) FROM outbox_events") == 12
        await other.execute("SELECT pg_advisory_unlock($1)", HOUSEKEEPING_LOCK_ID)
        assert (await housekeep(conn, retention_hours=168)).events_deleted == 5
    finally:
        await other.close()
    # the lock is not left held by the connection that did the pass
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        )
        == 0
    )


async def age(conn: asyncpg.Connection, event_ids: list[int]) -> None:
    """Make these events and their deliveries delivered past retention, each a millisecond apart
    (deliveries are deleted oldest first)."""
    await conn.execute(
        "UPDATE outbox_events SET created_at = now() - interval '400 hours' - id * interval '1 ms'"
        " WHERE id = ANY($1)",
        event_ids,
    )
    await conn.execute(
        "UPDATE deliveries SET status = 'DELIVERED',"
        "       delivered_at = now() - interval '200 hours' + event_id * interval '1 ms'"
        " WHERE event_id = ANY($1)",
        event_ids,
    )


async def test_a_pass_goes_on_while_it_finds_work(conn: asyncpg.Connection) -> None:
    """More than a pass used to delete (100 batches): with batches of 2, one pass clears 250
    delivered deliveries, their events and 30 events left without a delivery, and keeps the
    events a delivery still needs."""
    events = [e.id for e in await insert_events(conn, payments=300)]
    delivered, without_delivery, pending = events[:250], events[250:280], events[280:]
    await age(conn, delivered + without_delivery + pending)
    # No delivery: an endpoint that was removed took its undelivered deliveries with it.
    await conn.execute("DELETE FROM deliveries WHERE event_id = ANY($1)", without_delivery)
    await conn.execute(
        "UPDATE deliveries SET status = 'PENDING', delivered_at = NULL WHERE event_id = ANY($1)",
        pending,
    )

    result = await housekeep(conn, retention_hours=168, batch_size=2)

    assert (result.deliveries_deleted, result.events_deleted) == (250, 280)
    assert result.deliveries_deleted > 100 * 2, "more than the old cap of 100 batches a pass"
    left = {r["id"] for r in await conn.fetch("SELECT id FROM outbox_events")}
    assert left == set(pending)
    assert await conn.fetchval("SELECT count(*) FROM deliveries") == len(pending)
    assert not result.stopped
    again = await housekeep(conn, retention_hours=168, batch_size=2)
    assert (again.deliveries_deleted, again.events_deleted) == (0, 0)


async def test_a_pass_stops_when_the_relay_stops(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Held in its second batch (a row lock elsewhere), the relay's housekeeping is told to
    stop: it finishes that round and the loop returns, with the third batch still there."""
    events = [e.id for e in await insert_events(conn, payments=3 * BATCH_SIZE)]
    await age(conn, events)
    await conn.execute("ANALYZE deliveries")
    settings = Settings(_env_file=None, database_url=database_url)  # type: ignore[call-arg]
    pool = await create_pool(database_url, min_size=0, max_size=2)
    holder = await connect(database_url)
    try:
        state = RelayState(settings, RelayMetrics(), pool=pool)
        holder_tx = holder.transaction()
        await holder_tx.start()
        # The second batch's oldest delivery, locked: that batch's DELETE waits for it.
        await holder.execute(
            "SELECT 1 FROM deliveries WHERE event_id = $1 FOR UPDATE", events[BATCH_SIZE]
        )
        loop = asyncio.create_task(housekeeping_loop(state))
        await wait_for(
            lambda: waiting_for_a_lock(conn, "DELETE FROM deliveries"),
            timeout=30,
            what="housekeeping to reach its second batch",
        )
        state.stop.set()
        await holder_tx.rollback()
        await wait_for(loop.done, timeout=30, what="the housekeeping loop to return")
        loop.result()  # returned, not cancelled nor failed
    finally:
        await holder.close()
        await pool.close()
    assert await conn.fetchval("SELECT count(*) FROM deliveries") == BATCH_SIZE
    assert await conn.fetchval("SELECT count(*) FROM outbox_events") == BATCH_SIZE
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1::bigint",
            HOUSEKEEPING_LOCK_ID & 0xFFFFFFFF,
        )
        == 0
    ), "the pass let go of its lock"
