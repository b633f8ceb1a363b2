"""Decimal amounts to a Stripe-compatible gateway's integers and back.

The gateway counts money in whole minor units of the currency: INR 150.00 is 15000, JPY 500 is
500, KWD 5.120 is 5120. The exponent is the currency's ISO 4217 one, with the gateway's own
exceptions: it treats MGA as zero-decimal, keeps ISK in a two-decimal field that must hold whole
krónur, and takes three-decimal currencies only when the last digit is 0. An amount the currency
cannot carry there is refused, never rounded: rounding would charge something else than what was
asked. Currencies absent from the tables have two decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from payment_service.gateway.interface import AmountNotRepresentable


@dataclass(frozen=True)
class MinorUnit:
    """amount * 10**exponent is the integer sent; it must be a multiple of `step`."""

    exponent: int = 2
    step: int = 1


_ZERO_DECIMAL = MinorUnit(exponent=0)
_THREE_DECIMAL = MinorUnit(exponent=3, step=10)  # the last digit must be 0
_ZERO_DECIMAL_CODES = "BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF UGX VND VUV XAF XOF XPF"
_THREE_DECIMAL_CODES = "BHD JOD KWD OMR TND"
_MINOR_UNITS: dict[str, MinorUnit] = {
    **dict.fromkeys(_ZERO_DECIMAL_CODES.split(), _ZERO_DECIMAL),
    **dict.fromkeys(_THREE_DECIMAL_CODES.split(), _THREE_DECIMAL),
    "ISK": MinorUnit(exponent=2, step=100),  # whole krónur, in a two-decimal field
}
_DEFAULT = MinorUnit()


def minor_unit(currency: str) -> MinorUnit:
    return _MINOR_UNITS.get(currency.upper(), _DEFAULT)


def to_minor_units(amount: Decimal, currency: str) -> int:
    """`amount` in `currency` as the gateway's integer; `AmountNotRepresentable` if it cannot be.

    Refuses a non-finite or non-positive amount too: no charge or refund is for nothing.
    """
    if not amount.is_finite() or amount <= 0:
        raise AmountNotRepresentable(f"{amount} is not a positive amount")
    unit = minor_unit(currency)
    scaled = amount.scaleb(unit.exponent)
    if scaled != scaled.to_integral_value():
        raise AmountNotRepresentable(
            f"{currency.upper()} amounts have at most {unit.exponent} decimal(s); got {amount}"
        )
    units = int(scaled)
    if units % unit.step:
        decimals = unit.exponent - len(str(unit.step)) + 1
        raise AmountNotRepresentable(
            f"{currency.upper()} amounts have at most {decimals} decimal(s) at the gateway; "
            f"got {amount}"
        )
    return units


def from_minor_units(units: int, currency: str) -> Decimal:
    """The gateway's integer as a Decimal amount in `currency`, with the currency's decimals."""
    exponent = minor_unit(currency).exponent
    return Decimal(units).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent))
