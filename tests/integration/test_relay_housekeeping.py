"""Housekeeping removes only deliveries delivered past retention, events past retention that no
delivery needs any more, and expired idempotency keys."""

from __future__ import annotations

import asyncpg

from outbox_relay.housekeeping import housekeep
from outbox_relay.outbox import HOUSEKEEPING_LOCK_ID
from payment_service.database import connect
from tests.support.database import insert_events


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
