"""The gateway's domain types: what each status means, stable idempotency keys, and error texts."""

from __future__ import annotations

import pytest

from payment_service.gateway.interface import (
    GatewayDeclined,
    GatewayOutcomeUnknown,
    GatewayRefused,
    IntentStatus,
    RefundStatus,
)
from payment_service.gateway.stripe_adapter import cancel_key, confirm_key, create_key, refund_key


def test_final_and_confirmed_intent_statuses() -> None:
    final = {s for s in IntentStatus if s.final}
    confirmed = {s for s in IntentStatus if s.confirmed}
    assert final == {IntentStatus.SUCCEEDED, IntentStatus.FAILED, IntentStatus.CANCELED}
    assert confirmed == {IntentStatus.PROCESSING, IntentStatus.SUCCEEDED, IntentStatus.FAILED}
    assert {s for s in RefundStatus if s.final} == {
        RefundStatus.SUCCEEDED,
        RefundStatus.FAILED,
        RefundStatus.CANCELED,
    }


def test_idempotency_keys_are_derived_from_our_ids_and_the_gateways() -> None:
    assert create_key(42, "PAY-20261206-0a1b2c3d") == "payment-42-PAY-20261206-0a1b2c3d-create"
    assert confirm_key(42, "pi_123") == "payment-42-confirm-pi_123"
    assert cancel_key(42, "pi_123") == "payment-42-cancel-pi_123"
    assert refund_key(7, "pi_123") == "refund-7-pi_123"
    # Stable: the same ids give the same key in any process, at any time.
    assert confirm_key(42, "pi_123") == confirm_key(42, "pi_123")
    keys = {
        create_key(1, "r"),
        confirm_key(1, "pi_1"),
        cancel_key(1, "pi_1"),
        refund_key(1, "pi_1"),
    }
    assert len(keys) == 4


def test_errors_keep_the_gateways_code_and_message() -> None:
    declined = GatewayDeclined("Your card was declined.", code="card_declined", http_status=402)
    assert isinstance(declined, GatewayRefused)
    assert (declined.code, declined.message, declined.http_status) == (
        "card_declined",
        "Your card was declined.",
        402,
    )
    assert "card_declined" in str(declined)
    unknown = GatewayOutcomeUnknown("timeout")
    assert unknown.reason == "timeout" and "timeout" in str(unknown)


@pytest.mark.parametrize("status", list(IntentStatus))
def test_statuses_are_our_own_words(status: IntentStatus) -> None:
    assert status.value == status.name  # never the gateway's spelling
