"""SQL for the payment_refunds table. The caller owns the transaction and has locked the payment.

A refund is one statement, like a payment (app.payments): refund row, payment totals, the payment's
outbox event with its deliveries (app.payments.PAYMENT_EVENT, with the refund's fields) and the
key's stored answer (app.idempotency.STORE_ANSWER), composed by name (payment_service.sql). A
payment's refunds as a JSON list are the schema's `payment_refunds_json`, which GET /payments/{id}
uses too.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg

from app.idempotency import STORE_ANSWER, Guard
from app.payments import PAYMENT_EVENT
from payment_service.sql import Statement

INSERT_REFUND = Statement(
    f"""
    WITH refund AS (
        INSERT INTO payment_refunds (payment_id, amount, idempotency_hash, caller, metadata)
        VALUES (:payment_id, :amount, :key_hash, :caller, :metadata)
     RETURNING refund_id, amount, created_at
    ), payment AS (
        UPDATE payments AS p
           SET refunded_amount = p.refunded_amount + refund.amount,
               status = CASE WHEN p.refunded_amount + refund.amount = p.amount
                             THEN 'REFUNDED' ELSE 'PARTIALLY_REFUNDED' END,
               -- The event's `sequence`: one more state change of the (locked) payment.
               event_sequence = p.event_sequence + 1,
               updated_at = now()
          FROM refund
         WHERE p.payment_id = :payment_id
     RETURNING p,
               jsonb_build_object('refund_id', refund.refund_id,
                                  'refund_amount', refund.amount) AS event_fields
    ), {PAYMENT_EVENT}, answer AS (
        SELECT 200 AS status,
               jsonb_build_object(
                   'payment_id',       (payment.p).payment_id,
                   'refund_id',        refund.refund_id,
                   'refund_amount',    refund.amount,
                   'currency',         (payment.p).currency,
                   'status',           'REFUNDED',
                   'timestamp',        refund.created_at,
                   'payment_status',   (payment.p).status,
                   'refunded_amount',  (payment.p).refunded_amount,
                   'remaining_amount', (payment.p).amount - (payment.p).refunded_amount
               ) AS body
          FROM payment, refund
    ), {STORE_ANSWER}
    SELECT body FROM answer
    """
)


async def insert_refund(
    conn: asyncpg.Connection,
    *,
    guard: Guard,
    payment_id: int,
    amount: Decimal,
    metadata: dict[str, Any],
) -> str:
    """Refund `amount` of a locked payment: refund row, payment totals, outbox event, answer.

    The payments CHECK constraints (0 ≤ refunded_amount ≤ amount, status agrees with the total)
    back up the caller's arithmetic: a wrong sum fails the transaction instead of storing it.
    """
    body = await conn.fetchval(
        INSERT_REFUND.sql,
        *INSERT_REFUND.args(
            **guard.params(),
            event_type="payment.refunded",
            payment_id=payment_id,
            amount=amount,
            metadata=metadata,
        ),
    )
    return body  # type: ignore[no-any-return]


async def select_refunds_document(conn: asyncpg.Connection, *, payment_id: int) -> str | None:
    """GET /payments/{id}/refunds: None when the payment does not exist."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        """
        SELECT jsonb_build_object('payment_id', p.payment_id,
                                  'data', payment_refunds_json(p.payment_id))
          FROM payments AS p
         WHERE p.payment_id = $1
        """,
        payment_id,
    )
