"""SQL for the payments table. Functions take the connection first; the caller owns the transaction.

The write statements are single statements with data-modifying CTEs: the payment, its outbox event
and the idempotency row with its answer go to PostgreSQL in one round trip and are atomic even
without an explicit transaction. The relay is woken after the commit (app.notifier), not inside.
Documents are built by the SQL functions of the schema (`payment_json`, `payment_event_json`) and
come back as jsonb text, sent as is.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from app.idempotency import STORE_ANSWER, Guard

EVENT_FOR_STATUS = {
    "SUCCESS": "payment.succeeded",
    "PENDING": "payment.pending",
    "FAILED": "payment.failed",
}


@dataclass(frozen=True)
class InsertResult:
    acquired: bool  # False: another transaction holds the key
    body: str | None  # the answer; None when nothing was written (key stored or trip charged)


def new_reference_suffix() -> str:
    """The random part of `PAY-YYYYMMDD-<8 hex>`; the date comes from the database clock."""
    return secrets.token_hex(4)


# The outbox event of the payment that the CTE `payment` wrote (its row as column `payments`);
# the event type is $6 (after the guard's $1-$5) in both statements that use it. The payload's
# `sequence` is the row's `event_sequence`: 1 for a new payment, and every statement that changes
# a payment's state increments it in the same UPDATE that this event reads back.
PAYMENT_EVENT = """event AS (
            INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
            SELECT e.event_id, $6::text, (p.payments).payment_id,
                   payment_event_json(p.payments, e.event_id, $6::text)
              FROM payment AS p
             CROSS JOIN (SELECT gen_random_uuid() AS event_id) AS e
        )"""


async def insert_payment(
    conn: asyncpg.Connection,
    *,
    guard: Guard,
    trip_id: int,
    amount: Decimal,
    currency: str,
    method: str,
    status: str,
    metadata: dict[str, Any],
    extra_fields: dict[str, Any],
    response_status: int,
) -> InsertResult:
    """Insert a payment, its outbox event and the key's stored answer, if the key's lock is free.

    Nothing is written (`body` None) when another transaction holds the key's lock (`acquired`
    False) or when the key is already stored or the trip already charged. A race past those checks
    (or a reference collision) raises asyncpg.UniqueViolationError and writes nothing either.
    """
    row = await conn.fetchrow(
        f"""
        WITH lock AS (
            SELECT pg_try_advisory_xact_lock($7) AS acquired
        ), taken AS (
            -- Cheap index probes that send retries and charged trips to the careful path
            -- without a doomed insert; the unique indexes still decide every race.
            SELECT EXISTS (SELECT 1 FROM idempotency_keys WHERE key_hash = $1 AND caller = $2)
                   OR EXISTS (SELECT 1 FROM payments WHERE trip_id = $8 AND status <> 'FAILED')
                   AS taken
        ), payment AS (
            INSERT INTO payments
                   (trip_id, amount, currency, method, status, reference, idempotency_hash,
                    caller, metadata)
            SELECT $8, $9, $10, $11, $12,
                   'PAY-' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD') || '-' || $13,
                   $1, $2, $14
              FROM lock, taken
             WHERE lock.acquired
               AND NOT taken.taken
         RETURNING payments
        ), {PAYMENT_EVENT}, answer AS (
            SELECT $16::int AS status, payment_json(p.payments) || $15::jsonb AS body
              FROM payment AS p
        ), {STORE_ANSWER}
        SELECT lock.acquired,
               (SELECT body FROM answer) AS body
          FROM lock
        """,
        *guard.values(),
        EVENT_FOR_STATUS[status],
        guard.key.lock_id,
        trip_id,
        amount,
        currency,
        method,
        status,
        new_reference_suffix(),
        metadata,
        extra_fields,
        response_status,
    )
    assert row is not None
    return InsertResult(row["acquired"], row["body"])


async def select_live_payment_for_trip(conn: asyncpg.Connection, *, trip_id: int) -> int | None:
    """The trip's PENDING/SUCCESS/refunded payment, if any (FAILED ones do not count)."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        """
        SELECT payment_id
          FROM payments
         WHERE trip_id = $1
           AND status <> 'FAILED'
        """,
        trip_id,
    )


async def select_payment_for_update(
    conn: asyncpg.Connection, *, payment_id: int
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """
        SELECT payment_id, status, amount, refunded_amount, currency
          FROM payments
         WHERE payment_id = $1
           FOR UPDATE
        """,
        payment_id,
    )


async def update_payment_settlement(
    conn: asyncpg.Connection,
    *,
    guard: Guard,
    payment_id: int,
    status: str,
    gateway_reference: str | None,
    failure_reason: str | None,
) -> str:
    """Settle a PENDING payment (locked by the caller): status, outbox event, stored answer."""
    body = await conn.fetchval(
        f"""
        WITH payment AS (
            UPDATE payments
               SET status = $8,
                   gateway_reference = $9,
                   failure_reason = $10,
                   event_sequence = event_sequence + 1,
                   updated_at = now()
             WHERE payment_id = $7
         RETURNING payments
        ), {PAYMENT_EVENT}, answer AS (
            SELECT 200 AS status, payment_json(p.payments) AS body
              FROM payment AS p
        ), {STORE_ANSWER}
        SELECT body FROM answer
        """,
        *guard.values(),
        EVENT_FOR_STATUS[status],
        payment_id,
        status,
        gateway_reference,
        failure_reason,
    )
    return body  # type: ignore[no-any-return]


async def select_payment_document(conn: asyncpg.Connection, *, payment_id: int) -> str | None:
    """GET /payments/{id}: the payment with its refunds, oldest refund first."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        """
        SELECT payment_json(p) || jsonb_build_object(
                   'refunds', coalesce((SELECT jsonb_agg(refund_json(r) ORDER BY r.refund_id)
                                          FROM payment_refunds AS r
                                         WHERE r.payment_id = p.payment_id), '[]'::jsonb))
          FROM payments AS p
         WHERE p.payment_id = $1
        """,
        payment_id,
    )


async def select_payments_page(
    conn: asyncpg.Connection,
    *,
    trip_id: int | None,
    status: str | None,
    limit: int,
    starting_after: int | None,
) -> str:
    """GET /payments: newest first, keyset pagination on payment_id."""
    conditions = []
    args: list[Any] = []
    for column, operator, value in (
        ("trip_id", "=", trip_id),
        ("status", "=", status),
        ("payment_id", "<", starting_after),
    ):
        if value is not None:
            args.append(value)
            conditions.append(f"p.{column} {operator} ${len(args)}")
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    limit_arg, fetch_arg = len(args) + 1, len(args) + 2
    # One row more than asked tells whether there is a next page.
    return await conn.fetchval(  # type: ignore[no-any-return]
        f"""
        WITH page AS (
            SELECT p
              FROM payments AS p
              {where}
             ORDER BY p.payment_id DESC
             LIMIT ${fetch_arg}
        )
        SELECT jsonb_build_object(
                   'data', coalesce((SELECT jsonb_agg(payment_json(shown.p)
                                                      ORDER BY (shown.p).payment_id DESC)
                                       FROM (SELECT p FROM page
                                              ORDER BY (p).payment_id DESC
                                              LIMIT ${limit_arg}) AS shown), '[]'::jsonb),
                   'has_more', (SELECT count(*) FROM page) > ${limit_arg})
        """,
        *args,
        limit,
        limit + 1,
    )
