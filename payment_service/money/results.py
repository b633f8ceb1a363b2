"""What the gateway answered a charge or a refund, and how its result is written (phase 3).

The calls of a charge or a refund end in a verdict: `Decided` (the gateway decided: it moved the
money, or refused and nothing moved), `Undecided` (not yet, or unknown: ask again, never guess)
or `LeaseLost` (another process holds the operation now). A result is written by one statement
under the payment's row lock, taken first in the same transaction so that the statement's
snapshot holds whatever a concurrent writer (a webhook, the worker) committed before; it answers
the idempotency key's answer as it stands after the write (`Answer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from payment_service.database import acquire
from payment_service.sql import Statement


@dataclass(frozen=True)
class Decided:
    """The gateway decided: SUCCESS (a charge) or REFUNDED (a refund), or FAILED with its code and
    message (nothing moved)."""

    status: Literal["SUCCESS", "REFUNDED", "FAILED"]
    gateway_id: str | None  # the intent's or the refund's id; None: the gateway refused to make one
    failure_code: str | None = None
    failure_message: str | None = None

    @property
    def outcome(self) -> str:
        """How its operation ended, for operators."""
        return f"failed: {self.failure_code}" if self.status == "FAILED" else self.status.lower()


@dataclass(frozen=True)
class Undecided:
    """Not decided yet. `unknown`: the gateway could not be asked (a time-out, a 5xx, …), rather
    than answering that it is still processing."""

    reason: str
    unknown: bool
    gateway_id: str | None = None  # a refund's id, when the gateway answered one


@dataclass(frozen=True)
class LeaseLost:
    """Another process holds the operation: call and write nothing more."""


LEASE_LOST = LeaseLost()
Verdict = Decided | Undecided | LeaseLost


@dataclass(frozen=True)
class Answer:
    """An idempotency key's answer: what the request answers, and every retry replays."""

    status: int
    body: str  # jsonb text


# The CTE `closed`: the operation :operation_id closed with its :outcome (and the gateway's id of
# a refund, once known), its lease ended.
CLOSE_OPERATION = """closed AS (
        UPDATE gateway_operations
           SET phase = 'DONE',
               outcome = :outcome,
               gateway_refund_id = coalesce(gateway_refund_id, :gateway_refund_id),
               locked_until = NULL,
               claim_token = NULL,
               updated_at = now()
         WHERE operation_id = :operation_id
           AND phase <> 'DONE'
    )"""

# The CTE `handed`: an operation whose first answer was not a decision waits for its first check
# (:delay_seconds), its lease given back; by its holder only (:claim_token), from STARTED only.
# :checked and :unknown_checked (0 or 1) count the check when the gateway worker made it.
HAND_OVER_OPERATION = """handed AS (
        UPDATE gateway_operations
           SET phase = 'PENDING',
               checks = checks + :checked,
               unknown_checks = unknown_checks + :unknown_checked,
               gateway_refund_id = coalesce(gateway_refund_id, :gateway_refund_id),
               next_check_at = now() + make_interval(secs => :delay_seconds),
               last_error = :reason,
               locked_until = NULL,
               claim_token = NULL,
               updated_at = now()
         WHERE operation_id = :operation_id
           AND claim_token = :claim_token
           AND phase = 'STARTED'
    )"""

LOCK_PAYMENT = Statement("SELECT status FROM payments WHERE payment_id = :payment_id FOR UPDATE")


async def lock_payment(conn: asyncpg.Connection, payment_id: int) -> str | None:
    """Lock the payment's row for the caller's transaction; its status (None: no such payment)."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        LOCK_PAYMENT.sql, *LOCK_PAYMENT.args(payment_id=payment_id)
    )


async def write_result(
    conn: asyncpg.Connection, payment_id: int, statement: Statement, /, **values: Any
) -> Answer:
    """In the caller's transaction: lock the payment, run a result `statement` (its last query
    answers the key's status and body)."""
    await lock_payment(conn, payment_id)
    row = await conn.fetchrow(statement.sql, *statement.args(**values))
    assert row is not None
    return Answer(row["status"], row["body"])


async def write_result_alone(
    pool: asyncpg.Pool, payment_id: int, statement: Statement, /, **values: Any
) -> Answer:
    """`write_result` in a transaction of its own."""
    async with acquire(pool) as conn, conn.transaction():
        return await write_result(conn, payment_id, statement, **values)


def hand_over_values(undecided: Undecided, *, checked: bool) -> dict[str, Any]:
    """The values of HAND_OVER_OPERATION that come from the verdict."""
    return {
        "checked": int(checked),
        "unknown_checked": int(checked and undecided.unknown),
        "reason": undecided.reason[:300],
    }
