"""SQL of `gateway_operations` (one charge or refund at the gateway) and `gateway_events`.

An operation is staged with its payment or refund (the fragments below, in the API's statement),
leased by the process that makes its calls, and closed by the transaction that writes its result
(payment_service.money.charges, .refunds). The lease works as the relay's deliveries do: a claim
sets `locked_until` and a `claim_token`, and every write of the holder checks the token, so a
process whose lease was taken over changes nothing. A call to the gateway is made only under a
live lease, renewed (with the token checked) right before it: an operator's settlement is refused
while a lease runs, so the gateway is never asked to charge a payment that was settled meanwhile.

Functions take the connection first; the caller owns the transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from payment_service.sql import Statement
from payment_service.vocabulary import OperationKind, OperationPhase

# Time a lease adds to one call's time-out: the database round trips around the call, and clocks.
LEASE_MARGIN_SECONDS = 4.0


def lease_seconds(gateway_timeout_seconds: float) -> float:
    """How long a lease lasts: one call to the gateway (the adapter bounds each call by its
    time-out plus one second) and the margin. It is renewed before each call."""
    return gateway_timeout_seconds + 1 + LEASE_MARGIN_SECONDS


# -- staging: fragments of the API's first transaction --------------------------------------------
# The CTE `operation`: the charge of the payment the CTE `payment` (column p) just inserted,
# leased by the API for its first call.
STAGE_CHARGE = """operation AS (
        INSERT INTO gateway_operations
               (kind, payment_id, key_hash, caller, payment_method, customer, saved_method,
                locked_until, claim_token, created_at)
        SELECT 'CHARGE', (payment.p).payment_id, :key_hash, :caller, :payment_method, :customer,
               :saved_method, now() + make_interval(secs => :lease_seconds), :claim_token, now()
          FROM payment
     RETURNING operation_id
    )"""

# The CTE `operation`: the refund the CTE `refund` (columns refund_id, payment_id) just inserted,
# of the charge :intent_id, leased by the API for its call.
STAGE_REFUND = """operation AS (
        INSERT INTO gateway_operations
               (kind, payment_id, refund_id, intent_id, key_hash, caller, locked_until,
                claim_token, created_at)
        SELECT 'REFUND', refund.payment_id, refund.refund_id, :intent_id, :key_hash, :caller,
               now() + make_interval(secs => :lease_seconds), :claim_token, now()
          FROM refund
     RETURNING operation_id
    )"""


# -- the holder's writes -------------------------------------------------------------------------
# Records the intent a charge created, before it may be confirmed, and renews the lease for the
# confirm. (The payment shows it as its gateway_reference once its first answer is written: this
# statement touches the operation only, so it never waits for the payment's row lock while
# holding the operation's — the order every writer keeps is the payment's lock first.)
RECORD_INTENT = Statement(
    """
    UPDATE gateway_operations
       SET intent_id = :intent_id,
           locked_until = now() + make_interval(secs => :lease_seconds),
           updated_at = now()
     WHERE operation_id = :operation_id
       AND claim_token = :claim_token
       AND phase IN ('STARTED', 'PENDING', 'REVIEW')
       AND intent_id IS NULL
    RETURNING operation_id
    """
)

RENEW_LEASE = Statement(
    """
    UPDATE gateway_operations
       SET locked_until = now() + make_interval(secs => :lease_seconds)
     WHERE operation_id = :operation_id
       AND claim_token = :claim_token
       AND phase IN ('STARTED', 'PENDING', 'REVIEW')
    RETURNING operation_id
    """
)

RECORD_REFUND_ID = Statement(
    """
    WITH recorded AS (
        UPDATE gateway_operations
           SET gateway_refund_id = :gateway_refund_id,
               updated_at = now()
         WHERE operation_id = :operation_id
           AND claim_token = :claim_token
           AND gateway_refund_id IS NULL
     RETURNING refund_id
    )
    UPDATE payment_refunds AS r
       SET gateway_refund_id = :gateway_refund_id
      FROM recorded
     WHERE r.refund_id = recorded.refund_id
    RETURNING r.refund_id
    """
)

# A check that did not decide: ask again after :delay_seconds. `unknown`: the check could not
# learn the outcome; GATEWAY_MAX_CHECKS of those in a row flag the operation for review, and a
# check that learns anything (the gateway is still processing) ends the run.
RESCHEDULE = Statement(
    """
    UPDATE gateway_operations
       SET checks = checks + 1,
           unknown_checks = CASE WHEN :unknown THEN unknown_checks + 1 ELSE 0 END,
           phase = CASE WHEN :unknown AND unknown_checks + 1 >= :max_checks THEN 'REVIEW'
                        ELSE 'PENDING' END,
           next_check_at = now() + make_interval(secs => :delay_seconds),
           last_error = :reason,
           locked_until = NULL,
           claim_token = NULL,
           updated_at = now()
     WHERE operation_id = :operation_id
       AND claim_token = :claim_token
       AND phase IN ('PENDING', 'REVIEW')
    RETURNING phase
    """
)

# A lease given back unused (the worker stops): the operation is due again at once.
RELEASE = Statement(
    """
    UPDATE gateway_operations
       SET locked_until = NULL,
           claim_token = NULL
     WHERE operation_id = :operation_id
       AND claim_token = :claim_token
    """
)


async def record_intent(
    conn: asyncpg.Connection,
    *,
    operation_id: int,
    claim_token: uuid.UUID,
    intent_id: str,
    lease_seconds: float,
) -> bool:
    """Record the charge's intent; False when the lease was lost (do not confirm it then)."""
    row = await conn.fetchrow(
        RECORD_INTENT.sql,
        *RECORD_INTENT.args(
            operation_id=operation_id,
            claim_token=claim_token,
            intent_id=intent_id,
            lease_seconds=lease_seconds,
        ),
    )
    return row is not None


async def renew_lease(
    conn: asyncpg.Connection, *, operation_id: int, claim_token: uuid.UUID, lease_seconds: float
) -> bool:
    """Extend the lease before a call; False when it is no longer this holder's."""
    row = await conn.fetchrow(
        RENEW_LEASE.sql,
        *RENEW_LEASE.args(
            operation_id=operation_id, claim_token=claim_token, lease_seconds=lease_seconds
        ),
    )
    return row is not None


async def record_refund_id(
    conn: asyncpg.Connection,
    *,
    operation_id: int,
    claim_token: uuid.UUID,
    gateway_refund_id: str,
) -> None:
    await conn.execute(
        RECORD_REFUND_ID.sql,
        *RECORD_REFUND_ID.args(
            operation_id=operation_id,
            claim_token=claim_token,
            gateway_refund_id=gateway_refund_id,
        ),
    )


async def reschedule(
    conn: asyncpg.Connection,
    *,
    operation_id: int,
    claim_token: uuid.UUID,
    delay_seconds: float,
    unknown: bool,
    reason: str,
    max_checks: int,
) -> str | None:
    """Ask again later; the operation's phase after it (REVIEW once flagged), None when the lease
    was lost."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        RESCHEDULE.sql,
        *RESCHEDULE.args(
            operation_id=operation_id,
            claim_token=claim_token,
            delay_seconds=delay_seconds,
            unknown=unknown,
            reason=reason[:300],
            max_checks=max_checks,
        ),
    )


async def release(conn: asyncpg.Connection, *, operation_id: int, claim_token: uuid.UUID) -> None:
    await conn.execute(
        RELEASE.sql, *RELEASE.args(operation_id=operation_id, claim_token=claim_token)
    )


# Locks a payment's charge while it is not DONE, in the caller's transaction (an operator's
# settlement): whether a call for it may be in flight (its lease runs). Holding the row lock keeps
# a worker from claiming it, and a holder from renewing its lease, until the caller commits.
LOCK_OPEN_CHARGE = Statement(
    """
    SELECT coalesce(locked_until > now(), false) AS leased
      FROM gateway_operations
     WHERE payment_id = :payment_id
       AND kind = 'CHARGE'
       AND phase <> 'DONE'
       FOR UPDATE
    """
)


async def lock_open_charge(conn: asyncpg.Connection, *, payment_id: int) -> bool:
    """Lock the payment's charge if it is open; whether a call for it may be in flight."""
    return bool(
        await conn.fetchval(LOCK_OPEN_CHARGE.sql, *LOCK_OPEN_CHARGE.args(payment_id=payment_id))
    )


# -- the gateway worker's claim -------------------------------------------------------------------
@dataclass(frozen=True)
class Operation:
    """An operation as its holder needs it: its own columns, its payment's, and its refund's."""

    operation_id: int
    kind: OperationKind
    phase: OperationPhase
    claim_token: uuid.UUID
    payment_id: int
    trip_id: int
    reference: str
    amount: Decimal  # the payment's
    currency: str
    method: str
    key_hash: str
    caller: str
    claimed_at: datetime  # when its key was taken: its payment's or refund's created_at
    checks: int = 0
    unknown_checks: int = 0
    intent_id: str | None = None
    payment_method: str | None = None
    customer: str | None = None
    saved_method: bool = False
    refund_id: int | None = None
    refund_amount: Decimal | None = None
    gateway_refund_id: str | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record | dict[str, Any]) -> Operation:
        return cls(**{name: row[name] for name in _OPERATION_COLUMNS})


_OPERATION_COLUMNS = tuple(Operation.__dataclass_fields__)

# The columns of `Operation`, from `o` (gateway_operations), `p` (payments) and `r`
# (payment_refunds, LEFT JOINed).
OPERATION_SELECT = """o.operation_id, o.kind, o.phase, o.claim_token, o.payment_id, p.trip_id,
           p.reference, p.amount, p.currency, p.method, o.key_hash, o.caller,
           coalesce(r.created_at, p.created_at) AS claimed_at, o.checks, o.unknown_checks,
           o.intent_id, o.payment_method, o.customer, o.saved_method, o.refund_id,
           r.amount AS refund_amount, o.gateway_refund_id"""

# Leases up to :limit operations whose lease is free and whose check is due (an API's lease runs
# out only if it crashed or lost its connection: the grace period).
CLAIM_DUE = Statement(
    f"""
    WITH due AS (
        SELECT operation_id
          FROM gateway_operations
         WHERE phase IN ('STARTED', 'PENDING', 'REVIEW')
           AND next_check_at <= now()
           AND (locked_until IS NULL OR locked_until < now())
         ORDER BY next_check_at
         LIMIT :limit
           FOR UPDATE SKIP LOCKED
    ), o AS (
        UPDATE gateway_operations AS o
           SET locked_until = now() + make_interval(secs => :lease_seconds),
               claim_token = :claim_token
          FROM due
         WHERE o.operation_id = due.operation_id
     RETURNING o.*
    )
    SELECT {OPERATION_SELECT}
      FROM o
      JOIN payments AS p ON p.payment_id = o.payment_id
      LEFT JOIN payment_refunds AS r ON r.refund_id = o.refund_id
     ORDER BY o.next_check_at
    """
)

# When the next check of any operation is due (seconds from now; None: nothing is open).
NEXT_DUE = """
SELECT extract(epoch FROM min(greatest(next_check_at, locked_until)) - now())::float8
  FROM gateway_operations
 WHERE phase IN ('STARTED', 'PENDING', 'REVIEW')
"""


async def claim_due(
    conn: asyncpg.Connection, *, limit: int, lease_seconds: float, claim_token: uuid.UUID
) -> list[Operation]:
    rows = await conn.fetch(
        CLAIM_DUE.sql,
        *CLAIM_DUE.args(limit=limit, lease_seconds=lease_seconds, claim_token=claim_token),
    )
    return [Operation.from_row(row) for row in rows]


async def seconds_until_due(conn: asyncpg.Connection) -> float | None:
    value = await conn.fetchval(NEXT_DUE)
    return None if value is None else float(value)


# -- finding an operation -------------------------------------------------------------------------
CHARGE_OF_INTENT = Statement(
    f"""
    SELECT {OPERATION_SELECT}
      FROM gateway_operations AS o
      JOIN payments AS p ON p.payment_id = o.payment_id
      LEFT JOIN payment_refunds AS r ON r.refund_id = o.refund_id
     WHERE o.kind = 'CHARGE'
       AND o.intent_id = :intent_id
    """
)

OPERATION_OF_REFUND = Statement(
    f"""
    SELECT {OPERATION_SELECT}
      FROM gateway_operations AS o
      JOIN payments AS p ON p.payment_id = o.payment_id
      LEFT JOIN payment_refunds AS r ON r.refund_id = o.refund_id
     WHERE o.kind = 'REFUND'
       AND o.refund_id = :refund_id
    """
)


async def select_charge_of_intent(conn: asyncpg.Connection, *, intent_id: str) -> Operation | None:
    """The charge whose recorded intent is `intent_id`; None for an intent we did not record."""
    row = await conn.fetchrow(CHARGE_OF_INTENT.sql, *CHARGE_OF_INTENT.args(intent_id=intent_id))
    return None if row is None else Operation.from_row(row)


async def select_operation_of_refund(
    conn: asyncpg.Connection, *, refund_id: int
) -> Operation | None:
    row = await conn.fetchrow(
        OPERATION_OF_REFUND.sql, *OPERATION_OF_REFUND.args(refund_id=refund_id)
    )
    return None if row is None else Operation.from_row(row)


# -- gateway events -------------------------------------------------------------------------------
INSERT_GATEWAY_EVENT = Statement(
    """
    INSERT INTO gateway_events (event_id, gateway_type, object_id, payment_id, outcome, created_at)
    VALUES (:event_id, :gateway_type, :object_id, :payment_id, :outcome, :created_at)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
    """
)


SET_GATEWAY_EVENT_OUTCOME = Statement(
    """
    UPDATE gateway_events
       SET outcome = :outcome,
           payment_id = :payment_id
     WHERE event_id = :event_id
    """
)


async def insert_gateway_event(
    conn: asyncpg.Connection,
    *,
    event_id: str,
    gateway_type: str,
    object_id: str | None,
    payment_id: int | None,
    outcome: str,
    created_at: datetime,
) -> bool:
    """Store a gateway event once; False when it was stored before (a repeat)."""
    row = await conn.fetchrow(
        INSERT_GATEWAY_EVENT.sql,
        *INSERT_GATEWAY_EVENT.args(
            event_id=event_id,
            gateway_type=gateway_type[:100],
            object_id=object_id,
            payment_id=payment_id,
            outcome=outcome,
            created_at=created_at,
        ),
    )
    return row is not None


async def set_gateway_event_outcome(
    conn: asyncpg.Connection, *, event_id: str, outcome: str, payment_id: int | None
) -> None:
    await conn.execute(
        SET_GATEWAY_EVENT_OUTCOME.sql,
        *SET_GATEWAY_EVENT_OUTCOME.args(event_id=event_id, outcome=outcome, payment_id=payment_id),
    )


GATEWAY_EVENT_STORED = Statement("SELECT 1 FROM gateway_events WHERE event_id = :event_id")


async def gateway_event_stored(conn: asyncpg.Connection, *, event_id: str) -> bool:
    """Whether this gateway event was stored already (a repeat)."""
    return bool(
        await conn.fetchval(GATEWAY_EVENT_STORED.sql, *GATEWAY_EVENT_STORED.args(event_id=event_id))
    )


REFUND_STATUS = Statement("SELECT status FROM payment_refunds WHERE refund_id = :refund_id")


async def refund_status(conn: asyncpg.Connection, *, refund_id: int) -> str | None:
    """A refund's status (in the caller's transaction, under its payment's row lock)."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        REFUND_STATUS.sql, *REFUND_STATUS.args(refund_id=refund_id)
    )
