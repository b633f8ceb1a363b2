"""SQL for the payment_refunds table. The caller owns the transaction and has locked the payment.

A refund recorded at once (a payment not charged at a gateway) is one statement, like a payment
(app.payments): refund row, payment totals, the payment's outbox event with its deliveries and the
key's stored answer (payment_service.money.fragments), composed by name (payment_service.sql). A
refund made at the gateway is staged instead (STAGE_REFUND): the refund PENDING, its amount
reserved on the payment, its gateway operation leased to this request, its key taken without an
answer; payment_service.money.refunds makes it and writes its result. The answer's document is the
schema's `refund_result_json`, and a payment's refunds as a JSON list its `payment_refunds_json`,
which GET /payments/{id} uses too.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from app.idempotency import Guard, take_key
from payment_service.money.fragments import PAYMENT_EVENT, REFUNDED_EVENT, STORE_ANSWER
from payment_service.money.operations import STAGE_REFUND as STAGE_REFUND_OPERATION
from payment_service.sql import Statement

INSERT_REFUND = Statement(
    f"""
    WITH refund AS (
        INSERT INTO payment_refunds (payment_id, amount, idempotency_hash, caller, metadata)
        VALUES (:payment_id, :amount, :key_hash, :caller, :metadata)
     RETURNING payment_refunds AS r
    ), payment AS (
        UPDATE payments AS p
           SET refunded_amount = p.refunded_amount + (refund.r).amount,
               status = CASE WHEN p.refunded_amount + (refund.r).amount = p.amount
                             THEN 'REFUNDED' ELSE 'PARTIALLY_REFUNDED' END,
               -- The event's `sequence`: one more state change of the (locked) payment.
               event_sequence = p.event_sequence + 1,
               updated_at = now()
          FROM refund
         WHERE p.payment_id = :payment_id
     RETURNING p,
               jsonb_build_object('refund_id', (refund.r).refund_id,
                                  'refund_amount', (refund.r).amount) AS event_fields
    ), {PAYMENT_EVENT}, answer AS (
        SELECT 200 AS status, refund_result_json(refund.r, payment.p) AS body
          FROM payment, refund
    ), {STORE_ANSWER}
    SELECT body FROM answer
    """
)

# A refund at the gateway, staged: the refund PENDING, its amount reserved on the (locked) payment,
# its operation (a refund of the charge :intent_id) leased to this request, the key taken.
STAGE_REFUND = Statement(
    f"""
    WITH refund AS (
        INSERT INTO payment_refunds
               (payment_id, amount, status, idempotency_hash, caller, metadata)
        VALUES (:payment_id, :amount, 'PENDING', :key_hash, :caller, :metadata)
     RETURNING refund_id, payment_id, created_at
    ), reserved AS (
        UPDATE payments
           SET reserved_amount = reserved_amount + :amount
         WHERE payment_id = :payment_id
    ), {STAGE_REFUND_OPERATION}, {take_key("refund")}
    SELECT refund.refund_id, refund.created_at, operation.operation_id
      FROM refund, operation
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
            event_type=REFUNDED_EVENT,
            payment_id=payment_id,
            amount=amount,
            metadata=metadata,
        ),
    )
    return body  # type: ignore[no-any-return]


@dataclass(frozen=True)
class StagedRefund:
    refund_id: int
    created_at: datetime
    operation_id: int


async def stage_refund(
    conn: asyncpg.Connection,
    *,
    guard: Guard,
    payment_id: int,
    intent_id: str,
    amount: Decimal,
    metadata: dict[str, Any],
    lease_seconds: float,
    claim_token: uuid.UUID,
) -> StagedRefund:
    """Stage a refund of a locked payment at the gateway (STAGE_REFUND). The CHECK that
    refunded_amount + reserved_amount ≤ amount backs up the caller's arithmetic."""
    row = await conn.fetchrow(
        STAGE_REFUND.sql,
        *STAGE_REFUND.args(
            **guard.params(),
            payment_id=payment_id,
            intent_id=intent_id,
            amount=amount,
            metadata=metadata,
            lease_seconds=lease_seconds,
            claim_token=claim_token,
        ),
    )
    assert row is not None
    return StagedRefund(**dict(row))


REFUNDS_DOCUMENT = Statement(
    """
    SELECT jsonb_build_object('payment_id', p.payment_id,
                              'data', payment_refunds_json(p.payment_id))
      FROM payments AS p
     WHERE p.payment_id = :payment_id
    """
)


async def select_refunds_document(conn: asyncpg.Connection, *, payment_id: int) -> str | None:
    """GET /payments/{id}/refunds: None when the payment does not exist."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        REFUNDS_DOCUMENT.sql, *REFUNDS_DOCUMENT.args(payment_id=payment_id)
    )
