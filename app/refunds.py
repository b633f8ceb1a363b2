"""SQL for the payment_refunds table. The caller owns the transaction and has locked the payment."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg

from app.idempotency import STORE_ANSWER, Guard


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
        f"""
        WITH refund AS (
            INSERT INTO payment_refunds (payment_id, amount, idempotency_hash, caller, metadata)
            VALUES ($6, $7, $1, $2, $8)
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
             WHERE p.payment_id = $6
         RETURNING p
        ), event AS (
            INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
            SELECT e.event_id, 'payment.refunded', (payment.p).payment_id,
                   payment_event_json(payment.p, e.event_id, 'payment.refunded')
                   || jsonb_build_object('refund_id', refund.refund_id,
                                         'refund_amount', refund.amount)
              FROM payment, refund
             CROSS JOIN (SELECT gen_random_uuid() AS event_id) AS e
        ), answer AS (
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
        """,
        *guard.values(),
        payment_id,
        amount,
        metadata,
    )
    return body  # type: ignore[no-any-return]


async def select_refunds_document(conn: asyncpg.Connection, *, payment_id: int) -> str | None:
    """GET /payments/{id}/refunds: None when the payment does not exist."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        """
        SELECT jsonb_build_object(
                   'payment_id', p.payment_id,
                   'data', coalesce((SELECT jsonb_agg(refund_json(r) ORDER BY r.refund_id)
                                       FROM payment_refunds AS r
                                      WHERE r.payment_id = p.payment_id), '[]'::jsonb))
          FROM payments AS p
         WHERE p.payment_id = $1
        """,
        payment_id,
    )
