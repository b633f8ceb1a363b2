"""SQL for the payments table. Functions take the connection first; the caller owns the transaction.

The write statements are single statements with data-modifying CTEs: the payment, its outbox event,
one delivery per subscribed endpoint and the idempotency row with its answer go to PostgreSQL in
one round trip and are atomic even without an explicit transaction. The relay is woken after the
commit (app.notifier), not inside. They are composed of named fragments (the key's in
app.idempotency, the payment's outbox event and its deliveries here, which app.refunds uses too)
and compiled once at import (payment_service.sql), so each reads on its own and no `$n` spans
modules. Documents are built by the SQL functions of the schema (`payment_json`,
`payment_event_json`, `payment_refunds_json`) and come back as jsonb text, sent as is.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from app.idempotency import KEY_HAS_ROW, STORE_ANSWER, TRY_LOCK, Guard
from payment_service.sql import Statement

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


# The CTEs `event` and `fan_out`: the outbox event of a payment whose statement changed it, and
# its deliveries. They read the CTE `payment`, whose columns are `p` (the payment's new row) and
# `event_fields` (jsonb added to the payload: a refund's fields, else '{}'), and take the
# placeholder `:event_type`. The payload's `sequence` is the row's `event_sequence`: 1 for a new
# payment, and every statement that changes a payment's state increments it in the same UPDATE
# that this event reads back.
# `fan_out` writes one delivery per endpoint subscribed to the event's type, in the
# same statement, so the event and its deliveries commit together. It reads `endpoints` each time
# (no cache): an endpoint added a moment ago gets this event. PAUSED endpoints get theirs and hold
# them until resumed; DISABLED ones get none (`outbox replay --endpoint N --since T` backfills).
PAYMENT_EVENT = """event AS (
        INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
        SELECT e.event_id, :event_type::text, (payment.p).payment_id,
               payment_event_json(payment.p, e.event_id, :event_type::text)
               || payment.event_fields
          FROM payment
         CROSS JOIN (SELECT gen_random_uuid() AS event_id) AS e
     RETURNING id, event_type, aggregate_id
    ), fan_out AS (
        INSERT INTO deliveries (event_id, endpoint_id, aggregate_id)
        SELECT event.id, endpoint.endpoint_id, event.aggregate_id
          FROM event
          JOIN endpoints AS endpoint
            ON endpoint.state IN ('ACTIVE', 'PAUSED')
           AND endpoint_wants(endpoint.event_types, event.event_type)
         ORDER BY endpoint.endpoint_id
    )"""

# POST /payments in one statement: the key's lock, the payment, its event and the key's answer.
INSERT_PAYMENT = Statement(
    f"""
    WITH {TRY_LOCK}, taken AS (
        -- Cheap index probes that send retries and charged trips to the careful path
        -- without a doomed insert; the unique indexes still decide every race.
        SELECT {KEY_HAS_ROW}
               OR EXISTS (SELECT 1 FROM payments WHERE trip_id = :trip_id AND status <> 'FAILED')
               AS taken
    ), payment AS (
        INSERT INTO payments
               (trip_id, amount, currency, method, status, reference, idempotency_hash,
                caller, metadata)
        SELECT :trip_id, :amount, :currency, :method, :status,
               'PAY-' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD') || '-' || :reference_suffix,
               :key_hash, :caller, :metadata
          FROM lock, taken
         WHERE lock.acquired
           AND NOT taken.taken
     RETURNING payments AS p, '{{}}'::jsonb AS event_fields
    ), {PAYMENT_EVENT}, answer AS (
        SELECT :response_status::int AS status,
               payment_json(payment.p) || :extra_fields::jsonb AS body
          FROM payment
    ), {STORE_ANSWER}
    SELECT lock.acquired,
           (SELECT body FROM answer) AS body
      FROM lock
    """
)

# Settles a PENDING payment (locked by the caller): status, outbox event, the key's answer.
SETTLE_PAYMENT = Statement(
    f"""
    WITH payment AS (
        UPDATE payments
           SET status = :status,
               gateway_reference = :gateway_reference,
               failure_reason = :failure_reason,
               event_sequence = event_sequence + 1,
               updated_at = now()
         WHERE payment_id = :payment_id
     RETURNING payments AS p, '{{}}'::jsonb AS event_fields
    ), {PAYMENT_EVENT}, answer AS (
        SELECT 200 AS status, payment_json(payment.p) AS body
          FROM payment
    ), {STORE_ANSWER}
    SELECT body FROM answer
    """
)


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
        INSERT_PAYMENT.sql,
        *INSERT_PAYMENT.args(
            **guard.params(),
            lock_id=guard.key.lock_id,
            event_type=EVENT_FOR_STATUS[status],
            trip_id=trip_id,
            amount=amount,
            currency=currency,
            method=method,
            status=status,
            reference_suffix=new_reference_suffix(),
            metadata=metadata,
            extra_fields=extra_fields,
            response_status=response_status,
        ),
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
        SETTLE_PAYMENT.sql,
        *SETTLE_PAYMENT.args(
            **guard.params(),
            event_type=EVENT_FOR_STATUS[status],
            payment_id=payment_id,
            status=status,
            gateway_reference=gateway_reference,
            failure_reason=failure_reason,
        ),
    )
    return body  # type: ignore[no-any-return]


async def select_payment_document(conn: asyncpg.Connection, *, payment_id: int) -> str | None:
    """GET /payments/{id}: the payment with its refunds, oldest refund first."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        """
        SELECT payment_json(p) || jsonb_build_object('refunds', payment_refunds_json(p.payment_id))
          FROM payments AS p
         WHERE p.payment_id = $1
        """,
        payment_id,
    )


# GET /payments filters: (name, condition); a filter given in the request adds its condition.
PAGE_FILTERS = (
    ("trip_id", "p.trip_id = :trip_id"),
    ("status", "p.status = :status"),
    ("starting_after", "p.payment_id < :starting_after"),
)


@functools.cache
def payments_page_statement(filters: frozenset[str]) -> Statement:
    """The GET /payments statement with the conditions of `filters` (one per combination)."""
    conditions = [condition for name, condition in PAGE_FILTERS if name in filters]
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    # One row more than asked (:fetch) tells whether there is a next page.
    return Statement(
        f"""
        WITH page AS (
            SELECT p
              FROM payments AS p
              {where}
             ORDER BY p.payment_id DESC
             LIMIT :fetch
        )
        SELECT jsonb_build_object(
                   'data', coalesce((SELECT jsonb_agg(payment_json(shown.p)
                                                      ORDER BY (shown.p).payment_id DESC)
                                       FROM (SELECT p FROM page
                                              ORDER BY (p).payment_id DESC
                                              LIMIT :limit) AS shown), '[]'::jsonb),
                   'has_more', (SELECT count(*) FROM page) > :limit)
        """
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
    given = {
        name: value
        for name, value in (
            ("trip_id", trip_id),
            ("status", status),
            ("starting_after", starting_after),
        )
        if value is not None
    }
    statement = payments_page_statement(frozenset(given))
    return await conn.fetchval(  # type: ignore[no-any-return]
        statement.sql, *statement.args(**given, limit=limit, fetch=limit + 1)
    )


# The console's search: payments whose id, trip or reference is the one given, newest first
# (each condition through its own index: the primary key, payments_trip_id_idx, the reference's
# unique index).
MATCHING = Statement(
    """
    SELECT p.payment_id, p.trip_id, p.reference, p.status, p.amount, p.currency, p.created_at
      FROM payments AS p
     WHERE p.payment_id = :payment_id
        OR p.trip_id = :trip_id
        OR p.reference = :reference
     ORDER BY p.payment_id DESC
     LIMIT :limit
    """
)


async def select_payments_matching(
    conn: asyncpg.Connection,
    *,
    payment_id: int | None = None,
    trip_id: int | None = None,
    reference: str | None = None,
    limit: int = 20,
) -> list[asyncpg.Record]:
    """Payments whose id is `payment_id`, whose trip is `trip_id` or whose reference is
    `reference` (None: not that way), newest first."""
    values = MATCHING.args(payment_id=payment_id, trip_id=trip_id, reference=reference, limit=limit)
    return await conn.fetch(MATCHING.sql, *values)  # type: ignore[no-any-return]
