"""The values the code writes are values of payment_service/vocabulary.py's lists (which
tests/migrations/test_vocabulary.py holds against the schema's constraints)."""

from __future__ import annotations

import re

import pytest

from outbox_relay.schedule import Outcome
from payment_service.money.fragments import EVENT_FOR_STATUS, REFUND_FAILED_EVENT, REFUNDED_EVENT
from payment_service.vocabulary import (
    DELIVERY_STATUSES,
    EVENT_TYPES,
    GATEWAY_METHODS,
    MAX_EVENT_TYPES,
    PAYMENT_METHODS,
    PAYMENT_STATUSES,
    event_type_patterns,
)


def test_the_events_a_payment_writes_are_event_types() -> None:
    assert set(EVENT_FOR_STATUS) <= set(PAYMENT_STATUSES)
    written = {*EVENT_FOR_STATUS.values(), REFUNDED_EVENT, REFUND_FAILED_EVENT}
    assert written == set(EVENT_TYPES)


def test_the_relays_outcomes_are_delivery_statuses() -> None:
    assert {outcome.value for outcome in Outcome} == set(DELIVERY_STATUSES)


def test_gateway_methods_are_payment_methods_but_cash() -> None:
    assert set(GATEWAY_METHODS) == set(PAYMENT_METHODS) - {"CASH"}


def test_event_type_patterns() -> None:
    assert event_type_patterns(["payment.*", " * ", "payment.*"]) == ("payment.*", "*")
    assert event_type_patterns(list(EVENT_TYPES)) == EVENT_TYPES
    with pytest.raises(ValueError, match=f"at most {MAX_EVENT_TYPES}"):
        event_type_patterns(["payment.succeeded"] * (MAX_EVENT_TYPES + 1))
    with pytest.raises(ValueError, match="at least one"):
        event_type_patterns([" ", ""])
    with pytest.raises(ValueError, match=re.escape("unknown event type 'payment.created'")):
        event_type_patterns(["payment.created"])
    with pytest.raises(ValueError, match=re.escape("unknown event type 'charge.*'")):
        event_type_patterns(["charge.*"])
    assert event_type_patterns(["refund.*"]) == ("refund.*",)
