"""A refund at the gateway: the call (phase 2) and the transactions that write what the gateway
decided (phase 3), shared by the API, the gateway worker and the webhook.

The refund's amount was reserved on its payment (`payments.reserved_amount`) in the transaction
that staged it, under the payment's row lock, so concurrent refunds never exceed the payment
while the gateway decides. The refund is made with an idempotency key derived from our refund's
id, and carries our ids in its metadata. Not every gateway honours the key (the embedded one
does not), so a refund whose call may have been made before (any call but the API's first) is
first looked for at the gateway by our id (`find_refund`), and made again only if it is not there.

- succeeded: the refund REFUNDED, the payment PARTIALLY_REFUNDED or REFUNDED, payment.refunded;
- refused, failed or canceled at the gateway: the refund FAILED with the gateway's code and
  message, its amount freed, refund.failed;
- pending, or no answer: 202, the refund PENDING until the gateway decides (the worker asks).
"""

from __future__ import annotations

import logging

import asyncpg

from payment_service.database import acquire
from payment_service.gateway.interface import (
    Gateway,
    GatewayNotFound,
    GatewayOutcomeUnknown,
    GatewayRefused,
    Refund,
    RefundRequest,
    RefundStatus,
)
from payment_service.money import operations
from payment_service.money.fragments import (
    KEY_ANSWER,
    PAYMENT_EVENT,
    REFUND_FAILED_EVENT,
    REFUNDED_EVENT,
    answer_key,
)
from payment_service.money.operations import Operation
from payment_service.money.results import (
    CLOSE_OPERATION,
    HAND_OVER_OPERATION,
    LEASE_LOST,
    Answer,
    Decided,
    Undecided,
    Verdict,
    hand_over_values,
    write_result,
    write_result_alone,
)
from payment_service.sql import Statement

logger = logging.getLogger(__name__)


def refund_request(operation: Operation) -> RefundRequest:
    assert operation.refund_id is not None and operation.refund_amount is not None
    assert operation.intent_id is not None, "a gateway refund refunds a recorded intent"
    return RefundRequest(
        refund_id=operation.refund_id,
        payment_id=operation.payment_id,
        intent_id=operation.intent_id,
        amount=operation.refund_amount,
        currency=operation.currency,
    )


# -- phase 2 --------------------------------------------------------------------------------------
async def make_refund(
    pool: asyncpg.Pool,
    gateway: Gateway,
    operation: Operation,
    *,
    lease_seconds: float,
    first_call: bool,
) -> Verdict:
    """The call, under its holder's lease. `first_call`: no call can have been made for this
    refund before (the API, right after staging it); otherwise the gateway is asked first."""
    request = refund_request(operation)
    try:
        refund: Refund | None = None
        if operation.gateway_refund_id is not None:
            refund = await gateway.retrieve_refund(operation.gateway_refund_id)
        elif not first_call:
            refund = await gateway.find_refund(request.intent_id, request.refund_id)
        if refund is None:
            async with acquire(pool) as conn:
                leased = await operations.renew_lease(
                    conn,
                    operation_id=operation.operation_id,
                    claim_token=operation.claim_token,
                    lease_seconds=lease_seconds,
                )
            if not leased:
                return LEASE_LOST
            try:
                refund = await gateway.refund(request)
            except GatewayNotFound:
                raise
            except GatewayRefused as refused:
                return Decided("FAILED", None, refused.code or "refused", refused.message)
    except GatewayNotFound:
        return Undecided("the gateway does not find the refund or its charge", unknown=True)
    except GatewayRefused as refused:
        return Undecided(f"refused ({refused.code or refused.http_status})", unknown=True)
    except GatewayOutcomeUnknown as unknown:
        return Undecided(unknown.reason, unknown=True)
    match refund.status:
        case RefundStatus.SUCCEEDED:
            return Decided("REFUNDED", refund.id)
        case RefundStatus.FAILED | RefundStatus.CANCELED:
            return Decided(
                "FAILED",
                refund.id,
                refund.failure_code or "refund_failed",
                "The gateway could not make the refund.",
            )
        case _:
            return Undecided(refund.status.value.lower(), unknown=False, gateway_id=refund.id)


# -- phase 3 --------------------------------------------------------------------------------------
# The refund's answer (columns of `answer`), from the CTE `current` (columns r, p).
_REFUND_ANSWER = """answer AS (
        SELECT CASE WHEN (current.r).status = 'PENDING' THEN 202 ELSE 200 END AS status,
               refund_result_json(current.r, current.p) AS body,
               o.key_hash, o.caller, (current.r).created_at AS claimed_at
          FROM current, gateway_operations AS o
         WHERE o.operation_id = :operation_id
    )"""

# A decision on a refund: the refund's result, the payment's totals (the reservation released;
# refunded_amount and the status moved when it was refunded) and its event, if the refund is
# still PENDING; the operation closed; the key answered if it has no answer yet. The answer is
# the refund as it stands.
FINISH_REFUND = Statement(
    f"""
    WITH refund AS (
        UPDATE payment_refunds
           SET status = :refund_status,
               gateway_refund_id = coalesce(:gateway_refund_id, gateway_refund_id),
               failure_code = :failure_code,
               failure_message = :failure_message
         WHERE refund_id = :refund_id
           AND status = 'PENDING'
     RETURNING payment_refunds AS r,
               CASE WHEN status = 'REFUNDED' THEN amount ELSE 0 END AS refunded
    ), payment AS (
        UPDATE payments AS p
           SET refunded_amount = p.refunded_amount + refund.refunded,
               reserved_amount = p.reserved_amount - (refund.r).amount,
               status = CASE WHEN refund.refunded = 0 THEN p.status
                             WHEN p.refunded_amount + refund.refunded = p.amount THEN 'REFUNDED'
                             ELSE 'PARTIALLY_REFUNDED' END,
               event_sequence = p.event_sequence + 1,
               updated_at = now()
          FROM refund
         WHERE p.payment_id = :payment_id
     RETURNING p,
               jsonb_build_object('refund_id', (refund.r).refund_id,
                                  'refund_amount', (refund.r).amount)
               || CASE WHEN (refund.r).status = 'FAILED'
                       THEN jsonb_build_object('failure_code', (refund.r).failure_code,
                                               'failure_message', (refund.r).failure_message)
                       ELSE '{{}}'::jsonb END AS event_fields
    ), {PAYMENT_EVENT}, {CLOSE_OPERATION}, current AS (
        SELECT refund.r, payment.p FROM refund, payment
        UNION ALL
        SELECT r, p
          FROM payment_refunds AS r
          JOIN payments AS p ON p.payment_id = r.payment_id
         WHERE r.refund_id = :refund_id
           AND NOT EXISTS (SELECT 1 FROM refund)
    ), {_REFUND_ANSWER}, {answer_key()}
    {KEY_ANSWER}
    """
)

# A first answer that is not a decision: 202 with the refund PENDING (no event: the refund's
# event is its result), unless it was decided meanwhile. The operation waits for its first
# check; the gateway's id of the refund is kept if known.
HAND_OVER_REFUND = Statement(
    f"""
    WITH {HAND_OVER_OPERATION}, recorded AS (
        UPDATE payment_refunds
           SET gateway_refund_id = coalesce(gateway_refund_id, :gateway_refund_id)
         WHERE refund_id = :refund_id
           AND :gateway_refund_id::text IS NOT NULL
    ), current AS (
        SELECT r, p
          FROM payment_refunds AS r
          JOIN payments AS p ON p.payment_id = r.payment_id
         WHERE r.refund_id = :refund_id
    ), {_REFUND_ANSWER}, {answer_key()}
    {KEY_ANSWER}
    """
)


async def write_refund_result(
    conn: asyncpg.Connection, operation: Operation, decided: Decided
) -> Answer:
    """In the caller's transaction: write a decision (see FINISH_REFUND); the key's answer."""
    return await write_result(
        conn,
        operation.payment_id,
        FINISH_REFUND,
        operation_id=operation.operation_id,
        payment_id=operation.payment_id,
        refund_id=operation.refund_id,
        refund_status=decided.status,
        event_type=REFUNDED_EVENT if decided.status == "REFUNDED" else REFUND_FAILED_EVENT,
        gateway_refund_id=decided.gateway_id,
        failure_code=decided.failure_code,
        failure_message=decided.failure_message,
        outcome=decided.outcome,
    )


async def finish_refund(pool: asyncpg.Pool, operation: Operation, decided: Decided) -> Answer:
    """Phase 3 in a transaction of its own."""
    async with acquire(pool) as conn, conn.transaction():
        answer = await write_refund_result(conn, operation, decided)
    logger.info(
        "refund decided",
        extra={
            "payment_id": operation.payment_id,
            "refund_id": operation.refund_id,
            "outcome": decided.outcome,
        },
    )
    return answer


async def hand_over_refund(
    pool: asyncpg.Pool,
    operation: Operation,
    undecided: Undecided,
    *,
    delay_seconds: float,
    checked: bool,
) -> Answer:
    """Answer a refund the gateway has not decided (see HAND_OVER_REFUND)."""
    answer = await write_result_alone(
        pool,
        operation.payment_id,
        HAND_OVER_REFUND,
        operation_id=operation.operation_id,
        claim_token=operation.claim_token,
        refund_id=operation.refund_id,
        gateway_refund_id=undecided.gateway_id,
        delay_seconds=delay_seconds,
        **hand_over_values(undecided, checked=checked),
    )
    logger.info(
        "refund not decided yet; the gateway worker will ask again",
        extra={"refund_id": operation.refund_id, "reason": undecided.reason},
    )
    return answer
