"""A charge at the gateway: the calls (phase 2) and the transactions that write what the gateway
decided (phase 3), shared by the API, the gateway worker and the webhook.

`make_charge` makes the calls for an operation its caller holds the lease of, from wherever the
operation stands: with no intent recorded it creates one (unconfirmed) and records its id before
anything else; with one it asks the gateway about it. Then it acts on the intent's status:
confirm an unconfirmed intent (once, under a renewed lease), cancel one that needs the payer's
authentication, wait for one that is processing. It answers a `Verdict`
(payment_service.money.results):
- `Decided`: the gateway decided. SUCCESS, or FAILED with the gateway's code and message. FAILED
  only when nothing can move any more: a decline, an intent the gateway canceled or that failed,
  a create the gateway refused (no intent exists);
- `Undecided`: not yet (processing), or unknown (a time-out, a 5xx, …): ask again later, never
  guess;
- `LeaseLost`: another process holds the operation now; nothing more is called or written.

3-D Secure: a charge after the ride is made while the rider is not in the app, so nobody can
answer an authentication challenge. An intent that requires action is canceled, and only once
the gateway says it is canceled is the payment FAILED, with failure_code
`authentication_required` (Stripe's own code for an off-session charge that needs
authentication), which frees the trip: the Trip Service asks the rider to pay in the app.

`finish_charge` / `write_charge_result` write a decision (phase 3) and `hand_over_charge` an
undecided first answer (202, payment.pending); both under the payment's row lock, forward only:
a payment that is no longer PENDING keeps its state, and a key that has an answer keeps it.
"""

from __future__ import annotations

import logging

import asyncpg

from payment_service.database import acquire
from payment_service.gateway.interface import (
    ChargeRequest,
    Gateway,
    GatewayDeclined,
    GatewayNotFound,
    GatewayOutcomeUnknown,
    GatewayRefused,
    Intent,
    IntentStatus,
)
from payment_service.money import operations
from payment_service.money.fragments import EVENT_FOR_STATUS, KEY_ANSWER, PAYMENT_EVENT, answer_key
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

PENDING_MESSAGE = "Payment accepted for processing"
AUTHENTICATION_REQUIRED = "authentication_required"
AUTHENTICATION_MESSAGE = (
    "The payment method needs the payer's authentication (3-D Secure), which a charge made "
    "after the ride cannot ask for: the charge was canceled; ask the rider to pay in the app."
)
# Status changes of one intent that `make_charge` follows at most: a confirm, a cancel, and the
# statuses they lead to.
MAX_STEPS = 4


def charge_request(operation: Operation) -> ChargeRequest:
    assert operation.payment_method is not None, "a charge names its payment method"
    return ChargeRequest(
        payment_id=operation.payment_id,
        trip_id=operation.trip_id,
        reference=operation.reference,
        amount=operation.amount,
        currency=operation.currency,
        method=operation.method,
        payment_method=operation.payment_method,
        customer=operation.customer,
    )


# -- phase 2 --------------------------------------------------------------------------------------
async def make_charge(
    pool: asyncpg.Pool, gateway: Gateway, operation: Operation, *, lease_seconds: float
) -> Verdict:
    """The calls, from where `operation` stands, under its holder's lease (see the module)."""
    try:
        if operation.intent_id is None:
            try:
                intent = await gateway.create_intent(charge_request(operation))
            except GatewayRefused as refused:
                # Refused before an intent existed: nothing can ever be charged through it.
                return Decided("FAILED", None, refused.code or "refused", refused.message)
            async with acquire(pool) as conn:
                recorded = await operations.record_intent(
                    conn,
                    operation_id=operation.operation_id,
                    claim_token=operation.claim_token,
                    intent_id=intent.id,
                    lease_seconds=lease_seconds,
                )
            if not recorded:
                # Never confirmed: an orphan that moves no money (reconciliation lists it).
                return LEASE_LOST
            leased = True  # recording the intent renewed the lease for the confirm
        else:
            intent = await gateway.retrieve(operation.intent_id)
            leased = False
        return await _advance(pool, gateway, operation, intent, lease_seconds, leased=leased)
    except GatewayNotFound:
        # An intent we recorded that the gateway does not know: never a reason to fail a payment.
        return Undecided("the gateway does not find the intent", unknown=True)
    except GatewayRefused as refused:
        # A cancel refused while the intent could still be canceled: nothing was decided.
        return Undecided(f"refused ({refused.code or refused.http_status})", unknown=True)
    except GatewayOutcomeUnknown as unknown:
        return Undecided(unknown.reason, unknown=True)


async def _advance(
    pool: asyncpg.Pool,
    gateway: Gateway,
    operation: Operation,
    intent: Intent,
    lease_seconds: float,
    *,
    leased: bool,
) -> Verdict:
    """Act on the intent's status until the gateway decides or has to be asked again. `leased`:
    the lease was just renewed (no need to before the first call)."""
    canceled_because: tuple[str, str] | None = None  # (code, message) when we canceled it
    confirmed = False
    for _ in range(MAX_STEPS):
        match intent.status:
            case IntentStatus.SUCCEEDED:
                return Decided("SUCCESS", intent.id)
            case IntentStatus.FAILED:
                return Decided(
                    "FAILED",
                    intent.id,
                    intent.failure_code or "payment_failed",
                    intent.failure_message or "The gateway could not charge the payment method.",
                )
            case IntentStatus.CANCELED:
                code, message = canceled_because or (
                    "canceled",
                    "The charge was canceled at the gateway before it was made.",
                )
                return Decided("FAILED", intent.id, code, message)
            case IntentStatus.PROCESSING:
                return Undecided("processing", unknown=False)
            case IntentStatus.REQUIRES_CONFIRMATION if not confirmed:
                if not (leased or await _renew(pool, operation, lease_seconds)):
                    return LEASE_LOST
                confirmed = True
                try:
                    intent = await gateway.confirm(
                        intent.id,
                        payment_id=operation.payment_id,
                        saved_method=operation.saved_method,
                    )
                except GatewayDeclined as declined:
                    # The attempt failed at the gateway: the intent cannot charge any more.
                    return Decided(
                        "FAILED", intent.id, declined.code or "card_declined", declined.message
                    )
                except GatewayNotFound:
                    raise
                except GatewayRefused as refused:
                    # Refused unconfirmed (a parameter the gateway does not take, say): cancel
                    # it before failing the payment, so that nothing can ever confirm it.
                    canceled_because = (refused.code or "refused", refused.message)
                    canceled = await _cancel(pool, gateway, operation, intent, lease_seconds)
                    if canceled is None:
                        return LEASE_LOST
                    intent = canceled
            case IntentStatus.REQUIRES_ACTION:
                canceled_because = (AUTHENTICATION_REQUIRED, AUTHENTICATION_MESSAGE)
                canceled = await _cancel(pool, gateway, operation, intent, lease_seconds)
                if canceled is None:
                    return LEASE_LOST
                intent = canceled
            case _:
                break
    return Undecided(f"the intent stays {intent.status.value.lower()}", unknown=True)


async def _cancel(
    pool: asyncpg.Pool,
    gateway: Gateway,
    operation: Operation,
    intent: Intent,
    lease_seconds: float,
) -> Intent | None:
    """The intent canceled (or as it stands, if the gateway can no longer cancel it); None when
    the lease was lost first."""
    if not await _renew(pool, operation, lease_seconds):
        return None
    return await gateway.cancel(intent.id, payment_id=operation.payment_id)


async def _renew(pool: asyncpg.Pool, operation: Operation, lease_seconds: float) -> bool:
    async with acquire(pool) as conn:
        return await operations.renew_lease(
            conn,
            operation_id=operation.operation_id,
            claim_token=operation.claim_token,
            lease_seconds=lease_seconds,
        )


# -- phase 3 --------------------------------------------------------------------------------------
# The payment as it stands: the CTE `payment`'s new row if the statement changed it, else the
# (locked) row.
_CURRENT_PAYMENT = """current AS (
        SELECT payment.p FROM payment
        UNION ALL
        SELECT q FROM payments AS q
         WHERE q.payment_id = :payment_id
           AND NOT EXISTS (SELECT 1 FROM payment)
    )"""

# A decision on a charge: the payment's result and its event if it is still PENDING, the
# operation closed, the key answered if it has no answer yet (200, the payment as it stands).
FINISH_CHARGE = Statement(
    f"""
    WITH payment AS (
        UPDATE payments
           SET status = :status,
               failure_code = :failure_code,
               failure_message = :failure_message,
               failure_reason = :failure_message,
               gateway_reference = coalesce(:intent_id, gateway_reference),
               event_sequence = event_sequence + 1,
               updated_at = now()
         WHERE payment_id = :payment_id
           AND status = 'PENDING'
     RETURNING payments AS p, '{{}}'::jsonb AS event_fields
    ), {PAYMENT_EVENT}, {CLOSE_OPERATION}, {_CURRENT_PAYMENT}, answer AS (
        SELECT 200 AS status, payment_json(current.p) AS body,
               o.key_hash, o.caller, (current.p).created_at AS claimed_at
          FROM current, gateway_operations AS o
         WHERE o.operation_id = :operation_id
    ), {answer_key()}
    {KEY_ANSWER}
    """
)

# A first answer that is not a decision (the gateway is processing, or did not answer): 202 with
# the payment PENDING and its payment.pending event, unless the payment was decided meanwhile
# (a webhook): then its decision, 200. The operation waits for its first check.
HAND_OVER_CHARGE = Statement(
    f"""
    WITH {HAND_OVER_OPERATION}, payment AS (
        -- Its first event: a payment that has one was handed over already. Its intent, when one
        -- was recorded, is its gateway_reference.
        UPDATE payments
           SET event_sequence = event_sequence + 1,
               gateway_reference = (SELECT o.intent_id
                                      FROM gateway_operations AS o
                                     WHERE o.operation_id = :operation_id)
         WHERE payment_id = :payment_id
           AND status = 'PENDING'
           AND event_sequence = 0
     RETURNING payments AS p, '{{}}'::jsonb AS event_fields
    ), {PAYMENT_EVENT}, {_CURRENT_PAYMENT}, answer AS (
        SELECT CASE WHEN (current.p).status = 'PENDING' THEN 202 ELSE 200 END AS status,
               payment_json(current.p)
               || CASE WHEN (current.p).status = 'PENDING'
                       THEN jsonb_build_object('message', :message::text)
                       ELSE '{{}}'::jsonb END AS body,
               o.key_hash, o.caller, (current.p).created_at AS claimed_at
          FROM current, gateway_operations AS o
         WHERE o.operation_id = :operation_id
    ), {answer_key()}
    {KEY_ANSWER}
    """
)


async def write_charge_result(
    conn: asyncpg.Connection, operation: Operation, decided: Decided
) -> Answer:
    """In the caller's transaction: write a decision (see FINISH_CHARGE); the key's answer."""
    return await write_result(
        conn,
        operation.payment_id,
        FINISH_CHARGE,
        operation_id=operation.operation_id,
        payment_id=operation.payment_id,
        status=decided.status,
        event_type=EVENT_FOR_STATUS[decided.status],
        failure_code=decided.failure_code,
        failure_message=decided.failure_message,
        intent_id=decided.gateway_id,
        gateway_refund_id=None,
        outcome=decided.outcome,
    )


async def finish_charge(pool: asyncpg.Pool, operation: Operation, decided: Decided) -> Answer:
    """Phase 3 in a transaction of its own."""
    async with acquire(pool) as conn, conn.transaction():
        answer = await write_charge_result(conn, operation, decided)
    logger.info(
        "charge decided",
        extra={"payment_id": operation.payment_id, "outcome": decided.outcome},
    )
    return answer


async def hand_over_charge(
    pool: asyncpg.Pool,
    operation: Operation,
    undecided: Undecided,
    *,
    delay_seconds: float,
    checked: bool,
) -> Answer:
    """Answer a charge the gateway has not decided (see HAND_OVER_CHARGE); `checked`: this was a
    check of the gateway worker (it counts toward the operation's checks)."""
    answer = await write_result_alone(
        pool,
        operation.payment_id,
        HAND_OVER_CHARGE,
        operation_id=operation.operation_id,
        claim_token=operation.claim_token,
        payment_id=operation.payment_id,
        event_type=EVENT_FOR_STATUS["PENDING"],
        gateway_refund_id=None,
        delay_seconds=delay_seconds,
        message=PENDING_MESSAGE,
        **hand_over_values(undecided, checked=checked),
    )
    logger.info(
        "charge not decided yet; the gateway worker will ask again",
        extra={"payment_id": operation.payment_id, "reason": undecided.reason},
    )
    return answer
