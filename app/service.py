"""The operations behind the write endpoints. Each owns its transaction.

The common case of a new payment is one statement (one round trip): `insert_payment` takes the
key's advisory lock and writes payment + outbox event + its deliveries + key with its answer. The
relays are woken after the commit (the route pokes app.notifier), never by a NOTIFY inside the
transaction, which would serialise every commit on the server. Anything unusual (the key already
used or expired, the trip already charged, a reference collision) surfaces as a unique violation
and takes the careful path: an explicit transaction that claims the key first and decides under
its lock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from app import payments, refunds
from app.errors import APIError
from app.idempotency import (
    Guard,
    StoredResponse,
    claim_key,
    insert_key_response,
    key_in_progress,
)
from app.models import CreatePayment, CreateRefund, Settle
from payment_service.database import acquire

logger = logging.getLogger(__name__)

# A unique violation means another writer got there first; after it, the careful path decides
# under the key's lock. Two more rounds cover a reference collision on top of a race.
CAREFUL_ATTEMPTS = 3
PENDING_MESSAGE = "Payment accepted for processing"


@dataclass(frozen=True)
class Outcome:
    status: int
    body: str
    replayed: bool = False


def _replay(stored: StoredResponse) -> Outcome:
    return Outcome(stored.status, stored.body, replayed=True)


async def _store_business_error(conn: asyncpg.Connection, guard: Guard, error: APIError) -> Outcome:
    stored = await insert_key_response(conn, guard, status=error.status, body=error.problem())
    return Outcome(stored.status, stored.body)


# -- payments ------------------------------------------------------------------------------------
async def create_payment(
    pool: asyncpg.Pool,
    request: CreatePayment,
    *,
    guard: Guard,
    currency: str,
    asynchronous: bool,
) -> Outcome:
    status, response_status = ("PENDING", 202) if asynchronous else ("SUCCESS", 200)
    extra = {"message": PENDING_MESSAGE} if asynchronous else {}
    arguments: dict[str, Any] = {
        "guard": guard,
        "trip_id": request.trip_id,
        "amount": request.amount,
        "currency": currency,
        "method": request.method,
        "status": status,
        "metadata": request.metadata or {},
        "extra_fields": extra,
        "response_status": response_status,
    }
    async with acquire(pool) as conn:
        try:
            result = await payments.insert_payment(conn, **arguments)
        except asyncpg.UniqueViolationError:
            pass  # a race: the careful path below finds out which and answers accordingly
        else:
            if not result.acquired:
                raise key_in_progress()
            if result.body is not None:
                return Outcome(response_status, result.body)

        async def decide(conn: asyncpg.Connection) -> Outcome | None:
            stored = await claim_key(conn, guard)
            if stored is not None:
                return _replay(stored)
            charged = await payments.select_live_payment_for_trip(conn, trip_id=request.trip_id)
            if charged is not None:
                return await _store_business_error(conn, guard, trip_already_charged(charged))
            result = await payments.insert_payment(conn, **arguments)
            if result.body is None:
                return None  # the trip was charged by someone else just now: decide again
            return Outcome(response_status, result.body)

        return await _under_key(conn, decide)


async def _under_key(
    conn: asyncpg.Connection,
    decide: Callable[[asyncpg.Connection], Awaitable[Outcome | None]],
) -> Outcome:
    """Run `decide` in a transaction that starts by claiming the key, deciding again on a race.

    `claim_key` reads the key with its statement's snapshot, taken just before the advisory lock:
    a request with the same key that commits in between is invisible to it, and this request's
    own key insert then fails on the primary key. Rolled back, the next round sees that row and
    replays it. `decide` returning None asks for another round too.
    """
    for attempt in range(CAREFUL_ATTEMPTS):
        try:
            async with conn.transaction():
                outcome = await decide(conn)
        except asyncpg.UniqueViolationError as error:
            logger.info(
                "write raced; deciding again",
                extra={"constraint": error.constraint_name, "attempt": attempt + 1},
            )
            continue
        if outcome is not None:
            return outcome
    raise APIError(
        503,
        "CONFLICT_RETRY",
        "Too much contention; retry with the same key.",
        headers={"Retry-After": "1"},
    )


def trip_already_charged(payment_id: int) -> APIError:
    return APIError(
        409,
        "TRIP_ALREADY_CHARGED",
        f"Trip already has payment {payment_id}; a trip is charged at most once.",
        payment_id=payment_id,
    )


async def settle_payment(
    pool: asyncpg.Pool, payment_id: int, request: Settle, *, guard: Guard
) -> Outcome:
    async def decide(conn: asyncpg.Connection) -> Outcome:
        payment = await _claim_then_lock(conn, guard, payment_id)
        if isinstance(payment, Outcome):
            return payment
        if payment["status"] != "PENDING":
            return await _store_business_error(
                conn,
                guard,
                APIError(
                    409,
                    "PAYMENT_NOT_PENDING",
                    f"Payment {payment_id} is {payment['status']}; only a PENDING payment "
                    "can be settled.",
                    payment_status=payment["status"],
                ),
            )
        body = await payments.update_payment_settlement(
            conn,
            guard=guard,
            payment_id=payment_id,
            status=request.status,
            gateway_reference=request.gateway_reference,
            failure_reason=request.failure_reason if request.status == "FAILED" else None,
        )
        return Outcome(200, body)

    async with acquire(pool) as conn:
        return await _under_key(conn, decide)


# -- refunds -------------------------------------------------------------------------------------
REFUNDABLE = frozenset({"SUCCESS", "PARTIALLY_REFUNDED"})


async def refund_payment(
    pool: asyncpg.Pool, payment_id: int, request: CreateRefund, *, guard: Guard
) -> Outcome:
    async def decide(conn: asyncpg.Connection) -> Outcome:
        # The row lock serialises concurrent refunds of one payment: each sees the last one's sum.
        payment = await _claim_then_lock(conn, guard, payment_id)
        if isinstance(payment, Outcome):
            return payment
        if payment["status"] not in REFUNDABLE:
            return await _store_business_error(
                conn,
                guard,
                APIError(
                    400,
                    "PAYMENT_NOT_REFUNDABLE",
                    f"Payment {payment_id} is {payment['status']}; only SUCCESS or "
                    "PARTIALLY_REFUNDED payments can be refunded.",
                    payment_status=payment["status"],
                ),
            )
        remaining: Decimal = payment["amount"] - payment["refunded_amount"]
        amount = request.amount if request.amount is not None else remaining
        if amount > remaining:
            return await _store_business_error(
                conn,
                guard,
                APIError(
                    400,
                    "REFUND_EXCEEDS_REMAINING",
                    f"The refund of {amount} exceeds the remaining {remaining} "
                    f"{payment['currency']}.",
                    remaining_amount=str(remaining),
                ),
            )
        body = await refunds.insert_refund(
            conn,
            guard=guard,
            payment_id=payment_id,
            amount=amount,
            metadata=request.metadata or {},
        )
        return Outcome(200, body)

    async with acquire(pool) as conn:
        return await _under_key(conn, decide)


async def _claim_then_lock(
    conn: asyncpg.Connection, guard: Guard, payment_id: int
) -> Outcome | asyncpg.Record:
    """In the caller's transaction: the replayed answer if the key was used, else the payment's
    row, locked FOR UPDATE (404 when there is none)."""
    stored = await claim_key(conn, guard)
    if stored is not None:
        return _replay(stored)
    payment = await payments.select_payment_for_update(conn, payment_id=payment_id)
    if payment is None:
        raise payment_not_found(payment_id)
    return payment


def payment_not_found(payment_id: int) -> APIError:
    return APIError(404, "PAYMENT_NOT_FOUND", f"No payment with payment_id {payment_id}.")
