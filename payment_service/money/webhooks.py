"""The gateway's webhooks, verified by the caller (`Gateway.parse_webhook`), applied here.

Each event is stored once by the gateway's event id (`gateway_events`): a repeat changes nothing.
It is applied forward only, under the payment's row lock, in the transaction that stores it, with
the outbox event of the change: a PENDING payment whose recorded intent succeeded becomes
SUCCESS, one whose intent failed becomes FAILED; a refund in progress likewise. A payment or
refund already decided is never moved, and an event about an intent or refund we did not record
changes nothing.

An event is a snapshot that may be late or out of order, so only a success is taken from it as
it is (money that moved does not come back by itself). A failure is confirmed by asking the
gateway for the object as it stands now, and a cancellation is left to whoever holds the
operation (it canceled it, and knows why). If the gateway cannot be asked, `GatewayOutcomeUnknown`
is raised and nothing is stored: the gateway sends the webhook again, and the gateway worker
asks about the operation on its own schedule anyway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from payment_service.database import acquire
from payment_service.gateway.interface import (
    EventKind,
    Gateway,
    GatewayEvent,
    GatewayRefused,
    IntentStatus,
    RefundStatus,
)
from payment_service.money import charges, operations, refunds
from payment_service.money.operations import Operation
from payment_service.money.results import Decided, lock_payment

logger = logging.getLogger(__name__)

# What applying an event did (stored with it, and answered to the gateway).
APPLIED = "applied"
FINAL_ALREADY = "final_already"  # the payment or refund was decided before: nothing moved
NOT_OURS = "not_ours"  # about an intent or refund this service did not record
NOT_FINAL = "not_final"  # the object is not decided yet (or it was canceled: its holder decides)
IGNORED = "ignored"  # a kind of event the service does not act on
DUPLICATE = "duplicate"  # stored before: changes nothing


@dataclass(frozen=True)
class Applied:
    outcome: str
    payment_id: int | None = None


async def apply_event(pool: asyncpg.Pool, gateway: Gateway, event: GatewayEvent) -> Applied:
    """Store and apply one verified event (see the module); raises GatewayOutcomeUnknown when
    the gateway must be asked and cannot be."""
    async with acquire(pool) as conn:
        if await _stored(conn, event.id):
            return Applied(DUPLICATE)
        operation, object_id = await _operation_of(conn, event)
    decision = None
    if operation is not None and operation.phase != "DONE":
        decision = await _decision(gateway, event)
    async with acquire(pool) as conn, conn.transaction():
        stored = await operations.insert_gateway_event(
            conn,
            event_id=event.id,
            gateway_type=event.gateway_type,
            object_id=object_id,
            payment_id=operation.payment_id if operation else None,
            outcome=NOT_OURS if object_id else IGNORED,
            created_at=event.created,
        )
        if not stored:
            return Applied(DUPLICATE)
        if operation is None:
            return Applied(NOT_OURS if object_id else IGNORED)
        outcome = FINAL_ALREADY if operation.phase == "DONE" else NOT_FINAL
        if decision is not None:
            outcome = await _write(conn, operation, decision)
        await operations.set_gateway_event_outcome(
            conn, event_id=event.id, outcome=outcome, payment_id=operation.payment_id
        )
    logger.info(
        "gateway event applied",
        extra={
            "gateway_event": event.id,
            "gateway_type": event.gateway_type,
            "payment_id": operation.payment_id,
            "outcome": outcome,
        },
    )
    return Applied(outcome, operation.payment_id)


async def _stored(conn: asyncpg.Connection, event_id: str) -> bool:
    return await operations.gateway_event_stored(conn, event_id=event_id)


async def _operation_of(
    conn: asyncpg.Connection, event: GatewayEvent
) -> tuple[Operation | None, str | None]:
    """The operation the event is about, if it is one of ours; and the object's gateway id."""
    if event.kind == EventKind.INTENT and event.intent is not None:
        found = await operations.select_charge_of_intent(conn, intent_id=event.intent.id)
        return found, event.intent.id
    if event.kind == EventKind.REFUND and event.refund is not None:
        refund = event.refund
        found = None
        if refund.refund_id is not None:
            found = await operations.select_operation_of_refund(conn, refund_id=refund.refund_id)
        # Our refund id on a refund of another charge (another deployment's ids): not ours.
        if found is not None and found.intent_id != refund.intent_id:
            found = None
        return found, refund.id
    return None, None


async def _decision(gateway: Gateway, event: GatewayEvent) -> Decided | None:
    """What the event decides, asking the gateway when it reports a failure; None: nothing."""
    if event.intent is not None:
        intent = event.intent
        if intent.status == IntentStatus.FAILED:
            try:
                intent = await gateway.retrieve(intent.id)
            except GatewayRefused:  # not found, or refused: nothing to decide from
                return None
        if intent.status == IntentStatus.SUCCEEDED:
            return Decided("SUCCESS", intent.id)
        if intent.status == IntentStatus.FAILED:
            return Decided(
                "FAILED",
                intent.id,
                intent.failure_code or "payment_failed",
                intent.failure_message or "The gateway could not charge the payment method.",
            )
        return None
    if event.refund is not None:
        refund = event.refund
        if refund.status in (RefundStatus.FAILED, RefundStatus.CANCELED):
            try:
                refund = await gateway.retrieve_refund(refund.id)
            except GatewayRefused:
                return None
        if refund.status == RefundStatus.SUCCEEDED:
            return Decided("REFUNDED", refund.id)
        if refund.status == RefundStatus.FAILED:
            return Decided(
                "FAILED",
                refund.id,
                refund.failure_code or "refund_failed",
                "The gateway could not make the refund.",
            )
    return None


async def _write(conn: asyncpg.Connection, operation: Operation, decision: Decided) -> str:
    """Apply a decision in the caller's transaction; its outcome."""
    status = await lock_payment(conn, operation.payment_id)
    if operation.kind == "CHARGE":
        if status != "PENDING":
            return FINAL_ALREADY
        await charges.write_charge_result(conn, operation, decision)
        return APPLIED
    assert operation.refund_id is not None
    refund_status = await operations.refund_status(conn, refund_id=operation.refund_id)
    if refund_status != "PENDING":
        return FINAL_ALREADY
    await refunds.write_refund_result(conn, operation, decision)
    return APPLIED
