"""The operations behind the write endpoints. Each owns its transactions.

The common case of a new payment recorded at once (no gateway, or a method the gateway does not
charge) is one statement (one round trip): `insert_payment` takes the key's advisory lock and
writes payment + outbox event + its deliveries + key with its answer. The relays are woken after
the commit (the route pokes app.notifier), never by a NOTIFY inside the transaction, which would
serialise every commit on the server. Anything unusual (the key already used or expired, the trip
already charged, a reference collision) surfaces as a unique violation and takes the careful
path: an explicit transaction that claims the key first and decides under its lock.

A payment or refund charged at a gateway goes in phases (payment_service.money): staged in one
transaction (the same fast and careful paths), made at the gateway with no transaction open,
then written with its event and the key's answer in one more. The calls are shielded from the
client's disconnect: once staged, a charge goes on to its result whether anyone waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg

from app import payments, refunds
from app.errors import APIError
from app.idempotency import (
    Guard,
    StoredResponse,
    claim_key,
    insert_key_response,
    key_in_progress,
    select_key_answer,
)
from app.models import CreatePayment, CreateRefund, Settle, validate_model
from payment_service import audit
from payment_service.audit import Operator, Target
from payment_service.config import Settings
from payment_service.database import acquire
from payment_service.gateway.amounts import to_minor_units
from payment_service.gateway.factory import fallback_payment_method, gateway_from_settings
from payment_service.gateway.interface import AmountNotRepresentable, Gateway
from payment_service.money import charges
from payment_service.money import refunds as gateway_refunds
from payment_service.money.operations import Operation, lease_seconds, lock_open_charge
from payment_service.money.results import Answer, Decided, LeaseLost, Undecided
from payment_service.money.schedule import check_delay

logger = logging.getLogger(__name__)

# A unique violation means another writer got there first; after it, the careful path decides
# under the key's lock. Two more rounds cover a reference collision on top of a race.
CAREFUL_ATTEMPTS = 3
PENDING_MESSAGE = charges.PENDING_MESSAGE
RETRY_AFTER_SECONDS = "1"
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    status: int
    body: str
    replayed: bool = False
    # The status the request gave a new payment (SUCCESS, PENDING, FAILED), for the metrics.
    created: str | None = None


@dataclass(frozen=True)
class Charging:
    """What the API needs to charge at the gateway (None: GATEWAY=none)."""

    gateway: Gateway
    methods: frozenset[str]  # GATEWAY_METHODS
    lease_seconds: float
    first_check_seconds: float  # GATEWAY_CHECK_INTERVAL: the worker's first check after a 202
    fallback_payment_method: str | None  # GATEWAY_TEST_PAYMENT_METHOD where it may be used


def charging_from_settings(settings: Settings) -> Charging | None:
    """The gateway and its settings, or None with GATEWAY=none. Raises ConfigurationError (one
    line naming STRIPE_SECRET_KEY) when a gateway is wanted without a key."""
    gateway = gateway_from_settings(settings)
    if gateway is None:
        return None
    return Charging(
        gateway=gateway,
        methods=frozenset(settings.gateway_methods),
        lease_seconds=lease_seconds(settings.gateway_timeout_seconds),
        first_check_seconds=settings.gateway_check_interval,
        fallback_payment_method=fallback_payment_method(settings),
    )


def _replay(stored: StoredResponse) -> Outcome:
    return Outcome(stored.status, stored.body, replayed=True)


def _answered(answer: Answer, created: str | None = None) -> Outcome:
    return Outcome(answer.status, answer.body, created=created)


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
    charging: Charging | None = None,
    payment_method: str | None = None,
) -> Outcome:
    """Charge a trip: at the gateway when `charging` is given (then `payment_method` is the
    method to charge), else recorded at once (202 PENDING when `asynchronous`)."""
    if charging is not None:
        assert payment_method is not None
        return await _charge_at_gateway(
            pool, request, guard=guard, currency=currency, charging=charging,
            payment_method=payment_method,
        )  # fmt: skip
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
                return Outcome(response_status, result.body, created=status)

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
            return Outcome(response_status, result.body, created=status)

        return await _under_key(conn, decide)


def amount_problem(amount: Decimal, currency: str) -> str | None:
    """Why the gateway cannot charge `amount` in `currency` (too many decimals for it), or None."""
    try:
        to_minor_units(amount, currency)
    except AmountNotRepresentable as error:
        return str(error)
    return None


async def _charge_at_gateway(
    pool: asyncpg.Pool,
    request: CreatePayment,
    *,
    guard: Guard,
    currency: str,
    charging: Charging,
    payment_method: str,
) -> Outcome:
    token = uuid.uuid4()
    arguments: dict[str, Any] = {
        "guard": guard,
        "trip_id": request.trip_id,
        "amount": request.amount,
        "currency": currency,
        "method": request.method,
        "metadata": request.metadata or {},
        "payment_method": payment_method,
        "customer": request.customer,
        "saved_method": request.payment_method is not None,
        "lease_seconds": charging.lease_seconds,
        "claim_token": token,
    }
    # Phase 1: staged, by the fast path or the careful one.
    async with acquire(pool) as conn:
        staged: payments.StagedPayment | None = None
        try:
            staged = await payments.stage_payment(conn, **arguments)
        except asyncpg.UniqueViolationError:
            pass
        else:
            if not staged.acquired:
                raise key_in_progress()
        if staged is None or staged.operation_id is None:

            async def decide(conn: asyncpg.Connection) -> Outcome | payments.StagedPayment | None:
                stored = await claim_key(conn, guard)
                if stored is not None:
                    return _replay(stored)
                charged = await payments.select_live_payment_for_trip(conn, trip_id=request.trip_id)
                if charged is not None:
                    return await _store_business_error(conn, guard, trip_already_charged(charged))
                result = await payments.stage_payment(conn, **arguments)
                return None if result.operation_id is None else result

            decided: Outcome | payments.StagedPayment = await _under_key(conn, decide)
            if isinstance(decided, Outcome):
                return decided
            staged = decided
    assert staged.operation_id is not None and staged.payment_id is not None
    assert staged.reference is not None and staged.created_at is not None
    operation = Operation(
        operation_id=staged.operation_id,
        kind="CHARGE",
        phase="STARTED",
        claim_token=token,
        payment_id=staged.payment_id,
        trip_id=request.trip_id,
        reference=staged.reference,
        amount=request.amount,
        currency=currency,
        method=request.method,
        key_hash=guard.key.key_hash,
        caller=guard.key.caller,
        claimed_at=staged.created_at,
        payment_method=payment_method,
        customer=request.customer,
        saved_method=request.payment_method is not None,
    )
    # Phases 2 and 3.
    return await _shielded(_make_charge(pool, charging, operation))


async def _make_charge(pool: asyncpg.Pool, charging: Charging, operation: Operation) -> Outcome:
    verdict = await charges.make_charge(
        pool, charging.gateway, operation, lease_seconds=charging.lease_seconds
    )
    match verdict:
        case Decided():
            return _answered(await charges.finish_charge(pool, operation, verdict), verdict.status)
        case Undecided():
            answer = await charges.hand_over_charge(
                pool,
                operation,
                verdict,
                delay_seconds=check_delay(charging.first_check_seconds, 0),
                checked=False,
            )
            return _answered(answer, "PENDING" if answer.status == 202 else None)
        case LeaseLost():
            return await _taken_over(pool, operation)
    raise AssertionError(verdict)


async def _taken_over(pool: asyncpg.Pool, operation: Operation) -> Outcome:
    """A gateway worker took the operation over (this request outlived its lease): its answer if
    it wrote one already, else 409 (a retry with the key gets it once it is written)."""
    async with acquire(pool) as conn:
        stored = await select_key_answer(conn, key_hash=operation.key_hash, caller=operation.caller)
    if stored is None:
        raise key_in_progress()
    return Outcome(stored.status, stored.body)


async def _shielded(work: Awaitable[T]) -> T:
    """Await `work` in a task of its own that the request's cancellation (the client hung up)
    does not stop: a charge that was staged goes on to its result and the key's answer."""
    task = asyncio.ensure_future(work)
    _running.add(task)
    task.add_done_callback(_finished)
    return await asyncio.shield(task)


_running: set[asyncio.Future[Any]] = set()  # tasks whose request may have gone: kept alive


def _finished(task: asyncio.Future[Any]) -> None:
    _running.discard(task)
    if not task.cancelled() and (error := task.exception()) is not None:
        # Also raised to the request when it is still there; logged here for when it is not.
        logger.debug("gateway phase ended with an error", extra={"error": type(error).__name__})


async def _under_key(
    conn: asyncpg.Connection,
    decide: Callable[[asyncpg.Connection], Awaitable[T | None]],
) -> T:
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
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def trip_already_charged(payment_id: int) -> APIError:
    return APIError(
        409,
        "TRIP_ALREADY_CHARGED",
        f"Trip already has payment {payment_id}; a trip is charged at most once.",
        payment_id=payment_id,
    )


def operator_decision(
    key: str, status: str, reason: str, gateway_reference: str | None = None
) -> Settle:
    """The settlement an operator decides outside the admin API (the console's review page,
    `payment-service gateway settle`): `reason` goes to the audit log, and is a FAILED payment's
    failure message too. Raises APIError 400 for a value the admin API would refuse."""
    data: dict[str, Any] = {"idempotency_key": key, "status": status, "reason": reason}
    if status == "FAILED":
        data["failure_reason"] = reason
    if gateway_reference:
        data["gateway_reference"] = gateway_reference
    return validate_model(Settle, data)


async def settle_payment(
    pool: asyncpg.Pool, payment_id: int, request: Settle, *, guard: Guard, operator: Operator
) -> Outcome:
    """An operator's decision on a PENDING payment (POST /admin/payments/{id}/settlement, the
    console's gateway review): recorded in the audit log (`payment.settle`, who, the status before
    and after) in the transaction of the change; a replay of its key records nothing again."""

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
        if await lock_open_charge(conn, payment_id=payment_id):
            # A call to the gateway for this payment may be in flight: deciding now could fail a
            # payment the gateway is charging. Nothing is stored: retry shortly.
            raise APIError(
                409,
                "GATEWAY_CALL_IN_PROGRESS",
                f"Payment {payment_id} is being charged at the gateway right now; retry shortly.",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        # The payment's failure message goes into its document and its payment.failed event,
        # sent to every endpoint: a secret typed into it is masked there as in the audit log.
        failed = request.status == "FAILED"
        failure_reason = audit.masked(request.failure_reason) if failed else None
        body = await payments.update_payment_settlement(
            conn,
            guard=guard,
            payment_id=payment_id,
            status=request.status,
            gateway_reference=request.gateway_reference,
            failure_reason=failure_reason,
        )
        decided: dict[str, str] = {"status": request.status}
        if request.gateway_reference is not None:
            # Any text: one holding what looks like a signing secret is not recorded.
            reference = request.gateway_reference
            secret = audit.masked(reference) != reference
            decided["gateway_reference"] = "(not recorded: like a secret)" if secret else reference
        await audit.record(
            conn,
            operator=operator,
            action="payment.settle",
            target=Target("payment", str(payment_id)),
            before={"status": payment["status"]},
            after=decided,
            reason=request.reason or failure_reason,
        )
        return Outcome(200, body)

    async with acquire(pool) as conn:
        return await _under_key(conn, decide)


# -- refunds -------------------------------------------------------------------------------------
REFUNDABLE = frozenset({"SUCCESS", "PARTIALLY_REFUNDED"})


async def refund_payment(
    pool: asyncpg.Pool,
    payment_id: int,
    request: CreateRefund,
    *,
    guard: Guard,
    charging: Charging | None = None,
) -> Outcome:
    """Refund a payment: at the gateway when it was charged there (and `charging` is given),
    else recorded at once."""
    token = uuid.uuid4()

    async def decide(conn: asyncpg.Connection) -> Outcome | Operation:
        # The row lock serialises concurrent refunds of one payment: each sees the last one's sum
        # and the amounts reserved by refunds still at the gateway.
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
        remaining: Decimal = (
            payment["amount"] - payment["refunded_amount"] - payment["reserved_amount"]
        )
        amount = request.amount if request.amount is not None else remaining
        if amount > remaining or remaining <= 0:
            detail = (
                f"The refund of {amount} exceeds the remaining {remaining} {payment['currency']}."
                if remaining > 0
                else "Nothing remains to be refunded: the whole amount is refunded or being "
                "refunded."
            )
            return await _store_business_error(
                conn,
                guard,
                APIError(
                    400,
                    "REFUND_EXCEEDS_REMAINING",
                    detail,
                    remaining_amount=str(remaining),
                ),
            )
        if charging is None or payment["intent_id"] is None:
            body = await refunds.insert_refund(
                conn,
                guard=guard,
                payment_id=payment_id,
                amount=amount,
                metadata=request.metadata or {},
            )
            return Outcome(200, body)
        if problem := amount_problem(amount, payment["currency"]):
            return await _store_business_error(
                conn, guard, APIError(400, "AMOUNT_NOT_REPRESENTABLE", problem)
            )
        staged = await refunds.stage_refund(
            conn,
            guard=guard,
            payment_id=payment_id,
            intent_id=payment["intent_id"],
            amount=amount,
            metadata=request.metadata or {},
            lease_seconds=charging.lease_seconds,
            claim_token=token,
        )
        return Operation(
            operation_id=staged.operation_id,
            kind="REFUND",
            phase="STARTED",
            claim_token=token,
            payment_id=payment_id,
            trip_id=0,  # not sent with a refund
            reference="",
            amount=payment["amount"],
            currency=payment["currency"],
            method="",
            key_hash=guard.key.key_hash,
            caller=guard.key.caller,
            claimed_at=staged.created_at,
            intent_id=payment["intent_id"],
            refund_id=staged.refund_id,
            refund_amount=amount,
        )

    async with acquire(pool) as conn:
        decided: Outcome | Operation = await _under_key(conn, decide)
    if isinstance(decided, Outcome):
        return decided
    assert charging is not None
    return await _shielded(_make_refund(pool, charging, decided))


async def _make_refund(pool: asyncpg.Pool, charging: Charging, operation: Operation) -> Outcome:
    verdict = await gateway_refunds.make_refund(
        pool,
        charging.gateway,
        operation,
        lease_seconds=charging.lease_seconds,
        first_call=True,
    )
    match verdict:
        case Decided():
            return _answered(await gateway_refunds.finish_refund(pool, operation, verdict))
        case Undecided():
            answer = await gateway_refunds.hand_over_refund(
                pool,
                operation,
                verdict,
                delay_seconds=check_delay(charging.first_check_seconds, 0),
                checked=False,
            )
            return _answered(answer)
        case LeaseLost():
            return await _taken_over(pool, operation)
    raise AssertionError(verdict)


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
