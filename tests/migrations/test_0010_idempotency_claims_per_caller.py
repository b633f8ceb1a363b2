"""Migration 0010: one payment (one refund) per claim of an idempotency key *per caller*. Two
callers that send the same key in transactions with the same now() each get their payment and
their refund; one caller still gets one per claim. On a database in use the rows stay and the
indexes are rebuilt valid, the old ones gone."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from payment_service.migrations import load_migrations, migrate

VERSION = 10
KEY_HASH = hashlib.sha256(b"same-key").hexdigest()

INSERT_PAYMENT = """
    INSERT INTO payments (trip_id, amount, currency, method, status, reference, idempotency_hash,
                          caller)
    VALUES ($1::bigint, 10.00, 'INR', 'CARD', 'SUCCESS',
            'PAY-20260101-' || lpad(to_hex($1::bigint), 8, '0'), $2, $3)
    RETURNING payment_id
"""
INSERT_REFUND = """
    INSERT INTO payment_refunds (payment_id, amount, idempotency_hash, caller)
    VALUES ($1, 1.00, $2, $3)
"""


@pytest.fixture
async def before(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A database at the version before 0010, holding one caller's payment and refund."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        await migrate(conn, [m for m in load_migrations() if m.version < VERSION])
        payment_id = await conn.fetchval(INSERT_PAYMENT, 1, KEY_HASH, "svc-a")
        await conn.execute(INSERT_REFUND, payment_id, KEY_HASH, "svc-a")
        yield conn
    finally:
        await conn.close()


async def claims_of_two_callers(conn: asyncpg.Connection, trip_id: int) -> None:
    """In one transaction (one now()), the same key by `svc-a` and `svc-b`: a payment and a
    refund each."""
    async with conn.transaction():
        for offset, caller in enumerate(("svc-a", "svc-b")):
            payment_id = await conn.fetchval(INSERT_PAYMENT, trip_id + offset, KEY_HASH, caller)
            await conn.execute(INSERT_REFUND, payment_id, KEY_HASH, caller)


async def test_two_callers_may_claim_the_same_key_at_the_same_time(
    before: asyncpg.Connection,
) -> None:
    await migrate(before)

    await claims_of_two_callers(before, 100)

    assert await before.fetchval("SELECT count(*) FROM payments WHERE trip_id >= 100") == 2
    assert await before.fetchval("SELECT count(*) FROM payment_refunds") == 3


async def test_one_caller_still_claims_a_key_once_per_transaction(
    before: asyncpg.Connection,
) -> None:
    await migrate(before)
    async with before.transaction():
        payment_id = await before.fetchval(INSERT_PAYMENT, 200, KEY_HASH, "svc-a")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with before.transaction():
                await before.fetchval(INSERT_PAYMENT, 201, KEY_HASH, "svc-a")
        await before.execute(INSERT_REFUND, payment_id, KEY_HASH, "svc-a")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with before.transaction():
                await before.execute(INSERT_REFUND, payment_id, KEY_HASH, "svc-a")


async def test_the_rows_stay_and_the_indexes_are_rebuilt_valid(
    before: asyncpg.Connection,
) -> None:
    await migrate(before)
    assert await before.fetchval("SELECT count(*) FROM payments") == 1
    assert await before.fetchval("SELECT count(*) FROM payment_refunds") == 1
    rows = await before.fetch(
        """SELECT c.relname, i.indisvalid, pg_get_indexdef(i.indexrelid) AS definition
             FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid
            WHERE i.indrelid IN ('payments'::regclass, 'payment_refunds'::regclass)
              AND i.indisunique AND pg_get_indexdef(i.indexrelid) LIKE '%idempotency_hash%'"""
    )
    assert {(r["relname"], r["indisvalid"]) for r in rows} == {
        ("payments_one_per_caller_claim", True),
        ("payment_refunds_one_per_caller_claim", True),
    }
    assert all("(idempotency_hash, caller, created_at)" in r["definition"] for r in rows)
