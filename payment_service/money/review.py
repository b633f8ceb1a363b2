"""The charges and refunds flagged for review, with what the gateway says about each now: one
home for `payment-service gateway review` and the console's gateway review page.

An operation is flagged (phase REVIEW) when the gateway worker could not learn its outcome
GATEWAY_MAX_CHECKS times in a row: the payment stays PENDING (or the refund PENDING) rather than
be guessed. An operator decides a payment with its settlement (POST
/admin/payments/{id}/settlement, or the console's decision form, both one core function), or
waits for the worker's next check to finish it.

Reading the queue and asking the gateway are separate steps, so that no database connection is
held while the gateway is asked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from payment_service.gateway.interface import Gateway, GatewayError
from payment_service.money.operations import OPERATION_SELECT, Operation
from payment_service.sql import Statement

MAX_PAGE = 100
NOT_ASKED = "not asked: no gateway is configured here (STRIPE_SECRET_KEY)"

_ITEM_SELECT = f"""
    SELECT {OPERATION_SELECT},
           o.last_error, o.next_check_at, o.created_at AS staged_at,
           p.status AS payment_status, r.status AS refund_status
      FROM gateway_operations AS o
      JOIN payments AS p ON p.payment_id = o.payment_id
      LEFT JOIN payment_refunds AS r ON r.refund_id = o.refund_id"""

# Flagged operations, oldest first, in keyset pages of operation_id (the partial index
# gateway_operations_review_idx holds exactly these rows).
REVIEW_PAGE = Statement(
    f"""{_ITEM_SELECT}
     WHERE o.phase = 'REVIEW'
       AND o.operation_id > :after
     ORDER BY o.operation_id
     LIMIT :limit
    """
)

# A payment's charge still open (not DONE), flagged or not: what a decision on it is about.
OPEN_CHARGE = Statement(
    f"""{_ITEM_SELECT}
     WHERE o.payment_id = :payment_id
       AND o.kind = 'CHARGE'
       AND o.phase <> 'DONE'
    """
)


REVIEW_COUNT = "SELECT count(*) FROM gateway_operations WHERE phase = 'REVIEW'"


async def count_review(conn: asyncpg.Connection) -> int:
    """Operations flagged for review (outcome unknown after GATEWAY_MAX_CHECKS checks)."""
    return int(await conn.fetchval(REVIEW_COUNT))


@dataclass(frozen=True)
class ReviewItem:
    """A flagged operation as an operator reads it, and (once asked) what the gateway says."""

    operation: Operation
    payment_status: str
    refund_status: str | None
    last_error: str | None
    staged_at: datetime
    next_check_at: datetime
    gateway_says: str | None = None  # None: not asked yet

    @property
    def kind(self) -> str:
        return self.operation.kind.lower()

    @property
    def amount(self) -> Decimal:
        return self.operation.refund_amount or self.operation.amount

    @property
    def decidable(self) -> bool:
        """A charge whose payment is still PENDING: the settlement decides it."""
        return self.operation.kind == "CHARGE" and self.payment_status == "PENDING"

    def public(self) -> dict[str, Any]:
        """What `payment-service gateway review --json` shows of it."""
        operation = self.operation
        return {
            "operation_id": operation.operation_id,
            "kind": self.kind,
            "payment_id": operation.payment_id,
            "payment_status": self.payment_status,
            "refund_id": operation.refund_id,
            "refund_status": self.refund_status,
            "amount": self.amount,
            "currency": operation.currency,
            "intent_id": operation.intent_id,
            "gateway_refund_id": operation.gateway_refund_id,
            "checks": operation.checks,
            "last_error": self.last_error,
            "staged_at": self.staged_at,
            "next_check_at": self.next_check_at,
            "gateway_says": self.gateway_says,
        }


@dataclass(frozen=True)
class ReviewPage:
    items: list[ReviewItem]
    has_more: bool  # more are flagged: ask again with after = the last one's operation_id


async def select_review_page(
    conn: asyncpg.Connection, *, after: int = 0, limit: int = MAX_PAGE
) -> ReviewPage:
    """Up to `limit` flagged operations whose operation_id is above `after`, oldest first."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"a page holds 1 to {MAX_PAGE} operations")
    rows = await conn.fetch(REVIEW_PAGE.sql, *REVIEW_PAGE.args(after=after, limit=limit + 1))
    return ReviewPage([_item(row) for row in rows[:limit]], has_more=len(rows) > limit)


def _item(row: asyncpg.Record) -> ReviewItem:
    return ReviewItem(
        operation=Operation.from_row(row),
        payment_status=row["payment_status"],
        refund_status=row["refund_status"],
        last_error=row["last_error"],
        staged_at=row["staged_at"],
        next_check_at=row["next_check_at"],
    )


async def select_open_charge(conn: asyncpg.Connection, *, payment_id: int) -> ReviewItem | None:
    """The payment's charge at the gateway while it is open (None: none, or it is DONE)."""
    row = await conn.fetchrow(OPEN_CHARGE.sql, *OPEN_CHARGE.args(payment_id=payment_id))
    return None if row is None else _item(row)


async def select_review(conn: asyncpg.Connection) -> list[ReviewItem]:
    """Every flagged operation, oldest first (page after page)."""
    found: list[ReviewItem] = []
    after = 0
    while True:
        page = await select_review_page(conn, after=after)
        found.extend(page.items)
        if not page.has_more:
            return found
        after = page.items[-1].operation.operation_id


async def what_the_gateway_says(gateway: Gateway | None, operation: Operation) -> str:
    """What the gateway holds for the operation now, asked afresh, in one line."""
    if gateway is None:
        return NOT_ASKED
    try:
        if operation.kind == "CHARGE":
            if operation.intent_id is None:
                return "no intent was recorded: nothing was confirmed"
            intent = await gateway.retrieve(operation.intent_id)
            code = f" ({intent.failure_code})" if intent.failure_code else ""
            return f"intent {intent.status.value}{code}, {intent.currency} {intent.amount}"
        assert operation.intent_id is not None and operation.refund_id is not None
        if operation.gateway_refund_id is not None:
            refund = await gateway.retrieve_refund(operation.gateway_refund_id)
        else:
            found = await gateway.find_refund(operation.intent_id, operation.refund_id)
            if found is None:
                return "no refund was made"
            refund = found
        return f"refund {refund.id} {refund.status.value}, {refund.currency} {refund.amount}"
    except GatewayError as error:
        return f"unknown: {error}"


async def ask_the_gateway(gateway: Gateway | None, items: list[ReviewItem]) -> list[ReviewItem]:
    """The items with what the gateway says about each (asked concurrently)."""
    said = await asyncio.gather(*(what_the_gateway_says(gateway, i.operation) for i in items))
    return [replace(item, gateway_says=text) for item, text in zip(items, said, strict=True)]
