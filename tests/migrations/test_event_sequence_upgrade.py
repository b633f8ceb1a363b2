"""Upgrading to the `sequence` schema (db/migrations/0004_event_sequence.sql): existing payments get
their state-change count from their events (never fewer than their rows show), and the events
already written carry their own number, so one sent after the upgrade is numbered too."""

from __future__ import annotations

import json

import asyncpg

from payment_service.migrations import load_migrations, migrate


async def payment(db: asyncpg.Connection, trip_id: int, status: str, refunded: str = "0") -> int:
    return await db.fetchval(
        """
        INSERT INTO payments (trip_id, amount, currency, method, status, reference,
                              idempotency_hash, refunded_amount)
        VALUES ($1, 100.00, 'INR', 'CARD', $2, $3, repeat('a', 64), $4::numeric)
        RETURNING payment_id
        """,
        trip_id,
        status,
        f"PAY-20260101-{trip_id:08x}",
        refunded,
    )


async def event(db: asyncpg.Connection, payment_id: int, event_type: str) -> int:
    return await db.fetchval(
        """
        INSERT INTO outbox_events (event_type, aggregate_id, payload)
        VALUES ($1::text, $2, jsonb_build_object('event_type', $1::text, 'payment_id', $2::bigint))
        RETURNING id
        """,
        event_type,
        payment_id,
    )


async def refund_row(db: asyncpg.Connection, payment_id: int, amount: str) -> None:
    await db.execute(
        "INSERT INTO payment_refunds (payment_id, amount, idempotency_hash)"
        " VALUES ($1, $2::numeric, repeat('b', 64))",
        payment_id,
        amount,
    )


async def test_existing_payments_and_events_are_numbered(empty_db: asyncpg.Connection) -> None:
    migrations = load_migrations()
    (target,) = [m for m in migrations if m.name == "event_sequence"]
    await migrate(empty_db, [m for m in migrations if m.version < target.version])

    # Every event still there: charge, two refunds.
    kept = await payment(empty_db, 1, "PARTIALLY_REFUNDED", "30.00")
    kept_events = [
        await event(empty_db, kept, "payment.succeeded"),
        await event(empty_db, kept, "payment.refunded"),
        await event(empty_db, kept, "payment.refunded"),
    ]
    await refund_row(empty_db, kept, "10.00")
    await refund_row(empty_db, kept, "20.00")
    # Housekeeping deleted the charge's and the first refund's events; the second refund's is
    # pending. The rows still show three state changes.
    purged = await payment(empty_db, 2, "REFUNDED", "100.00")
    purged_event = await event(empty_db, purged, "payment.refunded")
    await refund_row(empty_db, purged, "50.00")
    await refund_row(empty_db, purged, "50.00")
    # Settled to FAILED with no events left at all: two state changes.
    failed = await payment(empty_db, 3, "FAILED")

    await migrate(empty_db, migrations)

    counters = dict(await empty_db.fetch("SELECT payment_id, event_sequence FROM payments"))
    assert counters == {kept: 3, purged: 3, failed: 2}
    numbered = {
        row["id"]: json.loads(row["payload"])["sequence"]
        for row in await empty_db.fetch("SELECT id, payload::text AS payload FROM outbox_events")
    }
    assert numbered == {kept_events[0]: 1, kept_events[1]: 2, kept_events[2]: 3, purged_event: 3}
    # The next state change continues from there.
    next_payload = await empty_db.fetchval(
        "SELECT payment_event_json(p, gen_random_uuid(), 'payment.refunded')::text"
        "  FROM payments AS p WHERE payment_id = $1",
        kept,
    )
    assert json.loads(next_payload)["sequence"] == 3
