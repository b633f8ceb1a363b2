"""A difference that a change between the gateway's listing and our read can make up is recorded
only if the gateway's object, asked for again, still makes it one (one call per suspected
difference); the others are recorded from the listing without asking."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from payment_service.gateway.interface import (
    GatewayNotFound,
    Intent,
    IntentStatus,
    Refund,
    RefundStatus,
)
from payment_service.money.reconcile import (
    Kind,
    Reconciliation,
    _compare_charge,
    _compare_refund,
    compare_again,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
REFERENCE = "PAY-20260601-00000007"
CHARGE = {
    "payment_id": 7,
    "status": "SUCCESS",
    "amount": Decimal("10.00"),
    "currency": "INR",
    "reference": REFERENCE,
    "intent_id": "pi_1",
    "phase": "DONE",
}
REFUND = {
    "refund_id": 3,
    "payment_id": 7,
    "amount": Decimal("4.00"),
    "status": "REFUNDED",
    "currency": "INR",
    "gateway_refund_id": "re_1",
    "intent_id": "pi_1",
}


def intent(status: IntentStatus, id: str = "pi_1") -> Intent:
    return Intent(id, status, Decimal("10.00"), "INR", NOW, 7, reference=REFERENCE)


def refund(status: RefundStatus) -> Refund:
    return Refund("re_1", status, Decimal("4.00"), "INR", NOW, "pi_1", refund_id=3, payment_id=7)


class Gateway:
    """What the gateway says now, and the ids it was asked for."""

    def __init__(self, *objects: Any) -> None:
        self.now = {obj.id: obj for obj in objects}
        self.asked: list[str] = []

    def retrieve(self) -> Callable[[str], Awaitable[Any]]:
        async def retrieve(object_id: str) -> Any:
            self.asked.append(object_id)
            if object_id not in self.now:
                raise GatewayNotFound(f"no such object: {object_id}", code=None, http_status=404)
            return self.now[object_id]

        return retrieve


def run() -> Reconciliation:
    return Reconciliation(since=NOW - timedelta(hours=1), until=NOW)


@pytest.mark.parametrize(
    ("compare", "row", "listed", "now"),
    [
        pytest.param(
            _compare_charge,
            CHARGE,
            intent(IntentStatus.PROCESSING),
            intent(IntentStatus.SUCCEEDED),
            id="charged: listed processing, succeeded since",
        ),
        pytest.param(
            _compare_charge,
            {**CHARGE, "status": "FAILED"},
            intent(IntentStatus.PROCESSING),
            intent(IntentStatus.FAILED),
            id="failed: listed processing, failed since",
        ),
        pytest.param(
            _compare_refund,
            REFUND,
            refund(RefundStatus.PENDING),
            refund(RefundStatus.SUCCEEDED),
            id="refunded: listed pending, succeeded since",
        ),
    ],
)
async def test_what_the_gateway_decided_since_it_was_listed_is_no_difference(
    compare: Any, row: dict[str, Any], listed: Any, now: Any
) -> None:
    gateway = Gateway(now)
    result = run()
    await compare_again(result, compare, row, [listed], gateway.retrieve())
    assert result.differences == []
    assert gateway.asked == [now.id]


async def test_a_charge_the_gateway_still_does_not_hold_succeeded_is_a_difference() -> None:
    gateway = Gateway(intent(IntentStatus.FAILED))
    result = run()
    listed = [intent(IntentStatus.PROCESSING)]
    await compare_again(result, _compare_charge, CHARGE, listed, gateway.retrieve())
    assert [(f.kind, f.intent_id) for f in result.differences] == [
        (Kind.CHARGED_WITHOUT_INTENT, "pi_1")
    ]
    assert "pi_1 FAILED" in result.differences[0].detail  # what the gateway says now
    assert gateway.asked == ["pi_1"]


async def test_a_refund_the_gateway_no_longer_knows_stays_a_difference() -> None:
    gateway = Gateway()
    result = run()
    await compare_again(result, _compare_refund, REFUND, [], gateway.retrieve())
    assert [f.kind for f in result.differences] == [Kind.REFUND_MISSING_AT_GATEWAY]
    assert gateway.asked == ["re_1"]


async def test_other_findings_are_recorded_without_asking_again() -> None:
    gateway = Gateway()
    result = run()
    pending = {**CHARGE, "status": "PENDING"}
    mismatched = {**CHARGE, "amount": Decimal("11.00")}
    listed = [intent(IntentStatus.SUCCEEDED)]
    await compare_again(result, _compare_charge, pending, listed, gateway.retrieve())
    await compare_again(result, _compare_charge, mismatched, listed, gateway.retrieve())
    assert [f.kind for f in result.notes] == [Kind.UNDECIDED_PAYMENT]
    assert [f.kind for f in result.differences] == [Kind.AMOUNT_MISMATCH]
    assert gateway.asked == []
