"""The pure parts of payment_service.money: when the gateway is asked again, how long a lease
lasts, how a decided operation is labelled."""

from __future__ import annotations

import pytest

from payment_service.money.operations import LEASE_MARGIN_SECONDS, lease_seconds
from payment_service.money.results import Decided
from payment_service.money.schedule import MAX_CHECK_INTERVAL_SECONDS, check_delay


def test_the_wait_between_checks_doubles_up_to_an_hour() -> None:
    waits = [check_delay(5, checks, jitter=0) for checks in range(12)]
    assert waits[:4] == [5, 10, 20, 40]
    assert waits[-1] == MAX_CHECK_INTERVAL_SECONDS == 3600
    assert waits == sorted(waits)
    assert check_delay(5, 10_000, jitter=0) == 3600  # no overflow, however many checks


@pytest.mark.parametrize("checks", [0, 3, 20])
def test_the_wait_is_spread_by_the_jitter(checks: int) -> None:
    base = check_delay(2, checks, jitter=0)
    waits = {check_delay(2, checks) for _ in range(50)}
    assert all(0.9 * base <= wait <= 1.1 * base for wait in waits)
    assert len(waits) > 1


def test_a_lease_outlasts_one_call_to_the_gateway() -> None:
    # The adapter bounds a call by its time-out plus one second.
    assert lease_seconds(10) == 10 + 1 + LEASE_MARGIN_SECONDS
    assert lease_seconds(1) > 2


def test_a_decided_operation_says_how_it_ended() -> None:
    assert Decided("SUCCESS", "pi_1").outcome == "success"
    assert Decided("REFUNDED", "re_1").outcome == "refunded"
    assert Decided("FAILED", "pi_1", "card_declined", "declined").outcome == "failed: card_declined"
