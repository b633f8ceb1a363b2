"""SQL for the payments table. Functions take the connection first; the caller owns the transaction.

The write statements are single statements with data-modifying CTEs: the payment, its outbox event,
one delivery per subscribed endpoint and the idempotency row with its answer go to PostgreSQL in
one round trip and are atomic even without an explicit transaction. The relay is woken after the
commit (app.notifier), not inside. They are composed of named fragments (the key's in
app.idempotency and payment_service.money.fragments, the payment's outbox event and its
deliveries in payment_service.money.fragments too)
and compiled once at import (payment_service.sql), so each reads on its own and no `$n` spans
modules. Documents are built by the SQL functions of the schema (`payment_json`,
`payment_event_json`, `payment_refunds_json`) and come back as jsonb text, sent as is.

A charge at the gateway is staged instead (STAGE_CHARGE): the payment PENDING, without an event,
its gateway operation leased to this request, its key taken without an answer. What follows is
payment_service.money.charges.
"""

from __future__ import annotations

import functools
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from app.idempotency import KEY_HAS_ROW, TRY_LOCK, Guard, take_key
from payment_service.money.fragments import (
    EVENT_FOR_STATUS,
    PAYMENT_EVENT,
    STORE_ANSWER,
    answer_key,
)
from payment_service.money.operations import STAGE_CHARGE
from payment_service.sql import Statement


@dataclass(frozen=True)
class InsertResult:
    acquired: bool  # False: another transaction holds the key
    body: str | None  # the answer; None when nothing was written (key stored or trip charged)


def new_reference_suffix() -> str:
    """The random part of `PAY-YYYYMMDD-<8 hex>`; the date comes from the database clock."""
    return secrets.token_hex(4)


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

# A charge at the gateway, staged (phase 1 of payment_service.money.charges): the key's lock, the
# payment PENDING with no event yet (event_sequence 0: its first event makes it 1), its gateway
# operation leased to this request for its first call (:lease_seconds, :claim_token), and the key
# taken without an answer. The same probes as INSERT_PAYMENT send races to the careful path.
STAGE_PAYMENT = Statement(
    f"""
    WITH {TRY_LOCK}, taken AS (
        SELECT {KEY_HAS_ROW}
               OR EXISTS (SELECT 1 FROM payments WHERE trip_id = :trip_id AND status <> 'FAILED')
               AS taken
    ), payment AS (
        INSERT INTO payments
               (trip_id, amount, currency, method, status, reference, idempotency_hash,
                caller, metadata, event_sequence)
        SELECT :trip_id, :amount, :currency, :method, 'PENDING',
               'PAY-' || to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDD') || '-' || :reference_suffix,
               :key_hash, :caller, :metadata, 0
          FROM lock, taken
         WHERE lock.acquired
           AND NOT taken.taken
     RETURNING payments AS p
    ), {STAGE_CHARGE}, {take_key("payment")}
    SELECT lock.acquired,
           (SELECT operation_id FROM operation) AS operation_id,
           (SELECT (payment.p).payment_id FROM payment) AS payment_id,
           (SELECT (payment.p).reference FROM payment) AS reference,
           (SELECT (payment.p).created_at FROM payment) AS created_at
      FROM lock
    """
)

# An operator's decision on a PENDING payment (locked by the caller): status, outbox event, the
# answer of the operator's key. A charge of the payment still waiting at the gateway is closed
# with it (the caller made sure no call is in flight), and the key of the request that staged it
# answered, if it had no answer yet.
SETTLE_PAYMENT = Statement(
    f"""
    WITH payment AS (
        UPDATE payments
           SET status = :status,
               gateway_reference = coalesce(:gateway_reference, gateway_reference),
               failure_reason = :failure_reason,
               failure_code = :failure_code,
               failure_message = :failure_reason,
               event_sequence = event_sequence + 1,
               updated_at = now()
         WHERE payment_id = :payment_id
     RETURNING payments AS p, '{{}}'::jsonb AS event_fields
    ), {PAYMENT_EVENT}, closed AS (
        UPDATE gateway_operations AS o
           SET phase = 'DONE',
               outcome = 'settled by ' || :caller || ': ' || :status,
               locked_until = NULL,
               claim_token = NULL,
               updated_at = now()
          FROM payment
         WHERE o.payment_id = :payment_id
           AND o.kind = 'CHARGE'
           AND o.phase <> 'DONE'
     RETURNING 200 AS status, payment_json(payment.p) AS body, o.key_hash, o.caller,
               (payment.p).created_at AS claimed_at
    ), {answer_key("closed")}, answer AS (
        SELECT 200 AS status, payment_json(payment.p) AS body
          FROM payment
    ), {STORE_ANSWER}
    SELECT body FROM answer
    """
)
# failure_code of a payment an operator settled FAILED.
MANUAL_FAILURE_CODE = "manual_settlement"


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


LIVE_PAYMENT_FOR_TRIP = Statement(
    """
    SELECT payment_id
      FROM payments
     WHERE trip_id = :trip_id
       AND status <> 'FAILED'
    """
)


async def select_live_payment_for_trip(conn: asyncpg.Connection, *, trip_id: int) -> int | None:
    """The trip's PENDING/SUCCESS/refunded payment, if any (FAILED ones do not count)."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        LIVE_PAYMENT_FOR_TRIP.sql, *LIVE_PAYMENT_FOR_TRIP.args(trip_id=trip_id)
    )


@dataclass(frozen=True)
class StagedPayment:
    acquired: bool  # False: another transaction holds the key
    operation_id: int | None  # None when nothing was written (key stored or trip charged)
    payment_id: int | None = None
    reference: str | None = None
    created_at: datetime | None = None


async def stage_payment(
    conn: asyncpg.Connection,
    *,
    guard: Guard,
    trip_id: int,
    amount: Decimal,
    currency: str,
    method: str,
    metadata: dict[str, Any],
    payment_method: str,
    customer: str | None,
    saved_method: bool,
    lease_seconds: float,
    claim_token: uuid.UUID,
) -> StagedPayment:
    """Stage a charge at the gateway (STAGE_PAYMENT); nothing is written when the key's lock is
    taken, the key stored or the trip charged, and a race raises UniqueViolationError, as in
    `insert_payment`."""
    row = await conn.fetchrow(
        STAGE_PAYMENT.sql,
        *STAGE_PAYMENT.args(
            **guard.params(),
            lock_id=guard.key.lock_id,
            trip_id=trip_id,
            amount=amount,
            currency=currency,
            method=method,
            reference_suffix=new_reference_suffix(),
            metadata=metadata,
            payment_method=payment_method,
            customer=customer,
            saved_method=saved_method,
            lease_seconds=lease_seconds,
            claim_token=claim_token,
        ),
    )
    assert row is not None
    return StagedPayment(**dict(row))


PAYMENT_FOR_UPDATE = Statement(
    """
    SELECT p.payment_id, p.status, p.amount, p.refunded_amount, p.reserved_amount,
           p.currency, o.intent_id
      FROM payments AS p
      LEFT JOIN gateway_operations AS o
             ON o.payment_id = p.payment_id
            AND o.kind = 'CHARGE'
     WHERE p.payment_id = :payment_id
       FOR UPDATE OF p
    """
)


async def select_payment_for_update(
    conn: asyncpg.Connection, *, payment_id: int
) -> asyncpg.Record | None:
    """The payment's row, locked, with `intent_id`: the intent of its charge at the gateway
    (None when it was not charged at a gateway)."""
    return await conn.fetchrow(
        PAYMENT_FOR_UPDATE.sql, *PAYMENT_FOR_UPDATE.args(payment_id=payment_id)
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
    """Settle a PENDING payment (locked by the caller): see SETTLE_PAYMENT."""
    body = await conn.fetchval(
        SETTLE_PAYMENT.sql,
        *SETTLE_PAYMENT.args(
            **guard.params(),
            event_type=EVENT_FOR_STATUS[status],
            payment_id=payment_id,
            status=status,
            gateway_reference=gateway_reference,
            failure_reason=failure_reason,
            failure_code=MANUAL_FAILURE_CODE if status == "FAILED" else None,
        ),
    )
    return body  # type: ignore[no-any-return]


PAYMENT_DOCUMENT = Statement(
    """
    SELECT payment_json(p) || jsonb_build_object('refunds', payment_refunds_json(p.payment_id))
      FROM payments AS p
     WHERE p.payment_id = :payment_id
    """
)


async def select_payment_document(conn: asyncpg.Connection, *, payment_id: int) -> str | None:
    """GET /payments/{id}: the payment with its refunds, oldest refund first."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        PAYMENT_DOCUMENT.sql, *PAYMENT_DOCUMENT.args(payment_id=payment_id)
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


# The console's search: payments whose id, trip or reference is the one given, or whose charge's
# intent or one of whose refunds' gateway id is, newest first (each condition through its own
# index: the primary key, payments_trip_id_idx, the reference's unique index,
# gateway_operations_charge_intent, payment_refunds_gateway_refund_idx).
MATCHING = Statement(
    """
    SELECT p.payment_id, p.trip_id, p.reference, p.status, p.amount, p.currency, p.created_at
      FROM payments AS p
     WHERE p.payment_id = :payment_id
        OR p.trip_id = :trip_id
        OR p.reference = :reference
        OR p.payment_id = ANY (ARRAY(SELECT o.payment_id
                                       FROM gateway_operations AS o
                                      WHERE o.kind = 'CHARGE'
                                        AND o.intent_id = :intent_id))
        OR p.payment_id = ANY (ARRAY(SELECT r.payment_id
                                       FROM payment_refunds AS r
                                      WHERE r.gateway_refund_id = :gateway_refund_id))
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
    intent_id: str | None = None,
    gateway_refund_id: str | None = None,
    limit: int = 20,
) -> list[asyncpg.Record]:
    """Payments whose id is `payment_id`, whose trip is `trip_id`, whose reference is
    `reference`, whose charge's intent at the gateway is `intent_id` or one of whose refunds is
    `gateway_refund_id` at the gateway (None: not that way), newest first."""
    values = MATCHING.args(
        payment_id=payment_id,
        trip_id=trip_id,
        reference=reference,
        intent_id=intent_id,
        gateway_refund_id=gateway_refund_id,
        limit=limit,
    )
    return await conn.fetch(MATCHING.sql, *values)  # type: ignore[no-any-return]
