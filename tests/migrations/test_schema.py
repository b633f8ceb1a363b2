"""The schema enforces the invariants itself, whatever the code does: one live
charge per trip, one payment per idempotency claim, 0 ≤ refunded ≤ amount, exact numeric money,
and the seed's `encode(digest(key,'sha256'),'hex')`."""

from __future__ import annotations

import hashlib
import itertools
import json
from decimal import Decimal

import asyncpg
import pytest

INSERT_PAYMENT = """
    INSERT INTO payments (trip_id, amount, currency, method, status, reference, idempotency_hash)
    VALUES ($1, $2, 'INR', 'CARD', $3, $4, $5)
    RETURNING payment_id
"""
_numbers = itertools.count(1)


async def insert_payment(
    db: asyncpg.Connection,
    *,
    trip_id: int = 1,
    amount: str = "10.00",
    status: str = "SUCCESS",
    reference: str | None = None,
    key_hash: str | None = None,
) -> int:
    n = next(_numbers)
    return await db.fetchval(
        INSERT_PAYMENT,
        trip_id,
        Decimal(amount),
        status,
        reference or f"PAY-20260101-{n:08x}",
        key_hash or hashlib.sha256(f"key-{n}".encode()).hexdigest(),
    )


async def test_digest_matches_the_seed_guide(db: asyncpg.Connection) -> None:
    value = await db.fetchval("SELECT encode(digest('demo-client-1','sha256'),'hex')")
    assert value == hashlib.sha256(b"demo-client-1").hexdigest()


async def test_one_live_charge_per_trip(db: asyncpg.Connection) -> None:
    await insert_payment(db, trip_id=7)
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert_payment(db, trip_id=7)
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert_payment(db, trip_id=7, status="PENDING")


async def test_failed_payments_free_the_trip(db: asyncpg.Connection) -> None:
    await insert_payment(db, trip_id=8, status="FAILED")
    await insert_payment(db, trip_id=8, status="FAILED")
    await insert_payment(db, trip_id=8, status="SUCCESS")
    assert await db.fetchval("SELECT count(*) FROM payments WHERE trip_id = 8") == 3


async def test_one_payment_per_idempotency_claim(db: asyncpg.Connection) -> None:
    key_hash = hashlib.sha256(b"same-key").hexdigest()
    async with db.transaction():  # one transaction: one now(), i.e. one claim of the key
        await insert_payment(db, trip_id=1, key_hash=key_hash)
        with pytest.raises(asyncpg.UniqueViolationError):
            async with db.transaction():
                await insert_payment(db, trip_id=2, key_hash=key_hash)


async def test_references_are_unique(db: asyncpg.Connection) -> None:
    await insert_payment(db, trip_id=1, reference="PAY-20260101-deadbeef")
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert_payment(db, trip_id=2, reference="PAY-20260101-deadbeef")


@pytest.mark.parametrize("amount", ["0", "-1.00"])
async def test_amount_is_positive(db: asyncpg.Connection, amount: str) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await insert_payment(db, amount=amount)


async def test_refunded_amount_stays_within_the_amount(db: asyncpg.Connection) -> None:
    payment_id = await insert_payment(db, amount="10.00")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "UPDATE payments SET refunded_amount = 10.01, status = 'PARTIALLY_REFUNDED' "
            "WHERE payment_id = $1",
            payment_id,
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "UPDATE payments SET refunded_amount = -0.01 WHERE payment_id = $1", payment_id
        )
    # The status follows the refunded amount.
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "UPDATE payments SET refunded_amount = 10.00 WHERE payment_id = $1", payment_id
        )
    await db.execute(
        "UPDATE payments SET refunded_amount = 10.00, status = 'REFUNDED' WHERE payment_id = $1",
        payment_id,
    )


async def test_money_is_exact_numeric(db: asyncpg.Connection) -> None:
    payment_id = await insert_payment(db, amount="0.29")
    assert (
        await db.fetchval("SELECT amount::text FROM payments WHERE payment_id = $1", payment_id)
        == "0.29"
    )
    column = await db.fetchrow(
        "SELECT data_type, numeric_precision, numeric_scale FROM information_schema.columns "
        "WHERE table_name = 'payments' AND column_name = 'amount'"
    )
    assert tuple(column) == ("numeric", 12, 2)
    document = await db.fetchval(
        "SELECT payment_json(p)::text FROM payments p WHERE payment_id = $1", payment_id
    )
    assert json.loads(document, parse_float=Decimal)["amount"] == Decimal("0.29")


async def test_timestamps_are_timestamptz(db: asyncpg.Connection) -> None:
    rows = await db.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND column_name LIKE '%\\_at' "
        "AND table_name IN ('payments', 'payment_refunds', 'idempotency_keys', 'outbox_events')"
    )
    assert rows
    for row in rows:
        assert row["data_type"] == "timestamp with time zone", dict(row)


async def test_refund_needs_an_existing_payment(db: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute(
            "INSERT INTO payment_refunds (payment_id, amount, idempotency_hash) "
            "VALUES (424242, 1.00, $1)",
            "0" * 64,
        )


async def test_outbox_event_needs_a_payment_and_a_known_type(db: asyncpg.Connection) -> None:
    payment_id = await insert_payment(db)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute(
            "INSERT INTO outbox_events (event_type, aggregate_id, payload) "
            "VALUES ('payment.succeeded', 424242, '{}')"
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "INSERT INTO outbox_events (event_type, aggregate_id, payload) "
            "VALUES ('payment.exploded', $1, '{}')",
            payment_id,
        )
    event_id = await db.fetchval(
        "INSERT INTO outbox_events (event_type, aggregate_id, payload) "
        "VALUES ('payment.succeeded', $1, '{}') RETURNING event_id",
        payment_id,
    )
    assert event_id is not None, "event_id has a default"


async def test_a_key_is_answered_whole_and_refunds_never_exceed_what_is_left(
    db: asyncpg.Connection,
) -> None:
    """Migration 0011: a key has both parts of its answer or neither (in progress), and the
    amount reserved by refunds at the gateway plus what was refunded never exceeds the payment."""
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "INSERT INTO idempotency_keys (key_hash, request_path, request_fingerprint, "
            "response_status, expires_at) VALUES ($1, 'POST:/payments', $1, 200, now())",
            "1" * 64,
        )
    await db.execute(
        "INSERT INTO idempotency_keys (key_hash, request_path, request_fingerprint, expires_at) "
        "VALUES ($1, 'POST:/payments', $1, now())",
        "2" * 64,
    )
    payment_id = await insert_payment(db, amount="10.00")
    await db.execute(
        "UPDATE payments SET reserved_amount = 4, refunded_amount = 6, "
        "status = 'PARTIALLY_REFUNDED' WHERE payment_id = $1",
        payment_id,
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute(
            "UPDATE payments SET reserved_amount = 5 WHERE payment_id = $1", payment_id
        )
