"""Amounts to the gateway's integers and back: a currency's decimals, and amounts it cannot carry
refused rather than rounded."""

from __future__ import annotations

from decimal import Decimal

import pytest

from payment_service.gateway.amounts import from_minor_units, to_minor_units
from payment_service.gateway.interface import AmountNotRepresentable


@pytest.mark.parametrize(
    ("amount", "currency", "units"),
    [
        ("150.00", "INR", 15000),
        ("150", "INR", 15000),
        ("0.29", "INR", 29),
        ("0.01", "usd", 1),
        ("1000000.00", "INR", 100000000),
        ("500", "JPY", 500),
        ("500.00", "JPY", 500),  # trailing zeros are not decimals
        ("1", "KRW", 1),
        ("7", "MGA", 7),  # zero-decimal at the gateway
        ("5.12", "KWD", 5120),  # three decimals, the last one 0
        ("5.120", "BHD", 5120),
        ("5", "ISK", 500),  # whole krónur in a two-decimal field
    ],
)
def test_amounts_in_minor_units(amount: str, currency: str, units: int) -> None:
    assert to_minor_units(Decimal(amount), currency) == units


@pytest.mark.parametrize(
    ("amount", "currency"),
    [
        ("0.001", "INR"),
        ("150.005", "USD"),
        ("0.5", "JPY"),
        ("10.01", "KRW"),
        ("5.125", "KWD"),  # the gateway takes three-decimal amounts only when they end in 0
        ("5.1201", "KWD"),
        ("5.50", "ISK"),
        ("0", "INR"),
        ("-1.00", "INR"),
        ("NaN", "INR"),
        ("Infinity", "INR"),
    ],
)
def test_an_amount_the_currency_cannot_carry_is_refused(amount: str, currency: str) -> None:
    with pytest.raises(AmountNotRepresentable):
        to_minor_units(Decimal(amount), currency)


@pytest.mark.parametrize(
    ("units", "currency", "amount"),
    [(15000, "INR", "150.00"), (29, "INR", "0.29"), (500, "JPY", "500"), (5120, "KWD", "5.120"),
     (500, "ISK", "5.00")],
)  # fmt: skip
def test_minor_units_back_to_amounts(units: int, currency: str, amount: str) -> None:
    back = from_minor_units(units, currency)
    assert back == Decimal(amount) and str(back) == amount


@pytest.mark.parametrize("amount", ["0.01", "0.29", "1.10", "99.99", "123456.78", "1000000.00"])
def test_the_round_trip_keeps_the_amount(amount: str) -> None:
    assert from_minor_units(to_minor_units(Decimal(amount), "INR"), "INR") == Decimal(amount)
