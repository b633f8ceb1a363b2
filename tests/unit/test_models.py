"""Pure parsing: exact money, JSON bodies, metadata limits, idempotency derivations."""

from __future__ import annotations

import hashlib
import json
import re
from decimal import Decimal

import pytest

from app.errors import APIError
from app.idempotency import IdempotencyKey, fingerprint
from app.models import (
    CreatePayment,
    amount_pattern,
    parse_amount,
    parse_json_object,
    parse_metadata,
    validate_model,
)
from payment_service import exact_json


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (Decimal("0.29"), "0.29"),
        (Decimal("1.15"), "1.15"),
        (Decimal("19.99"), "19.99"),
        ("12.34", "12.34"),
        (150, "150.00"),
        (Decimal("1.230"), "1.23"),
    ],
)
def test_amounts_are_exact(raw: object, expected: str) -> None:
    assert str(parse_amount(raw)) == expected


@pytest.mark.parametrize(
    "raw",
    [Decimal("1.234"), 0, -1, Decimal("1e308"), True, "abc", " 1.00", "NaN", "Infinity", None, [1]],
)
def test_bad_amounts_are_refused(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_amount(raw)


def test_json_numbers_never_become_floats() -> None:
    body = parse_json_object(b'{"amount": 0.29, "metadata": {"x": 0.1}}')
    assert body["amount"] == Decimal("0.29")
    assert isinstance(body["amount"], Decimal)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b"[1, 2]",
        b'"text"',
        b'{"amount": NaN}',
        b'{"a": Infinity}',
        b"\xff\xfe{",
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_malformed_bodies_are_400(raw: bytes) -> None:
    with pytest.raises(APIError) as caught:
        parse_json_object(raw)
    assert caught.value.status == 400


def test_metadata_limits() -> None:
    assert parse_metadata({"note": "ok 🚕", "n": Decimal("1.5")}) == {"note": "ok 🚕", "n": 1.5}
    for bad in (
        {str(i): i for i in range(51)},
        {"big": "x" * 9000},
        {"nul": "a\x00b"},
        {"surrogate": "\ud800"},
        {"huge": Decimal("1e1001")},
        {"tiny": Decimal("1e-1001")},
        [1],
    ):
        with pytest.raises(ValueError):
            parse_metadata(bad)


def test_metadata_numbers_are_kept_exactly() -> None:
    sent = b'{"x": 0.1000000000000000055511151231257827, "n": 1e400, "i": ' + b"9" * 400 + b"}"
    metadata = parse_metadata(parse_json_object(sent))
    assert metadata["x"] == Decimal("0.1000000000000000055511151231257827")
    assert metadata["n"] == Decimal("1e400")
    assert metadata["i"] == 10**400 - 1
    assert exact_json.dumps(metadata) == sent.decode().replace("1e400", "1E+400")


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b'{"amount": 1, "amount": 2}', '"amount" appears more than once'),
        (b'{"m": {"a": 1, "b": {"a": 2}, "a": 3}}', '"a" appears more than once'),
        (b'{"amount": 1e99999999999999999999999999}', "out of range"),
        (b'{"m": [1e-99999999999999999999999999]}', "out of range"),
        (b'{"trip_id": ' + b"9" * 5000 + b"}", "digits"),
        (b'{"trip_id": ', "Expecting value at line 1, column 13"),
        (b'{"a": 1} x', "Extra data at line 1, column 10"),
        (b'{"k": "\xff"}', "not valid UTF-8"),
    ],
)
def test_refused_json_says_why_without_python_internals(raw: bytes, detail: str) -> None:
    with pytest.raises(APIError) as caught:
        parse_json_object(raw)
    assert caught.value.status == 400
    assert detail in caught.value.detail, caught.value.detail
    for internal in ("Error", "sys.set_int_max_str_digits", "<class", "char "):
        assert internal not in caught.value.detail


@pytest.mark.parametrize(
    "raw",
    ["1E+2", "1e2", "\u0663", "1_0", "+1", "-1", "1.", ".5", "1.5\n", "1,5", "١٢.٣٤", "0x10"],
)
def test_amount_strings_are_ascii_decimals_only(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_amount(raw)


@pytest.mark.parametrize("raw", [b"1E+2", b"1e2", b"1.5e1", b"100e-2"])
def test_amount_numbers_with_an_exponent_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError, match="exponent"):
        parse_amount(parse_json_object(b'{"a": ' + raw + b"}")["a"])


@pytest.mark.parametrize("maximum", ["1000000.00", "250.37", "1", "9.99", "10.5", "99999.90"])
def test_amount_pattern_takes_exactly_the_amounts_up_to_the_maximum(maximum: str) -> None:
    limit = Decimal(maximum)
    pattern = re.compile(amount_pattern(limit))
    whole = int(limit)
    candidates = {"0", "0.0", "0.00", "0.01", "00.5", "1.", "", "1e2", "\u0663", " 1", "1.005"}
    for number in [*range(0, 120), *range(whole - 3, whole + 3), whole * 10]:
        for fraction in ["", ".0", ".9", ".00", ".01", ".36", ".37", ".38", ".89", ".99"]:
            candidates |= {f"{number}{fraction}", f"00{number}{fraction}"}
    for text in candidates:
        try:
            accepted = parse_amount(text) <= limit
        except ValueError:
            accepted = False
        assert bool(pattern.fullmatch(text)) == accepted, (maximum, text)


def test_deep_metadata_is_a_validation_error_not_a_crash() -> None:
    # json.loads accepts this depth; the metadata walk must refuse it instead of recursing out.
    deep = parse_json_object(b'{"m": ' + b'{"a": ' * 600 + b"1" + b"}" * 600 + b"}")["m"]
    with pytest.raises(APIError) as caught:
        validate_model(
            CreatePayment, {"trip_id": 1, "method": "CARD", "amount": "1.00", "metadata": deep}
        )
    assert caught.value.status == 400
    assert [e["field"] for e in caught.value.errors or []] == ["metadata"]


def test_create_payment_validation_lists_fields() -> None:
    with pytest.raises(APIError) as caught:
        validate_model(
            CreatePayment, {"trip_id": 2**63, "method": "BITCOIN", "amount": "1", "extra": 1}
        )
    fields = {error["field"] for error in caught.value.errors or []}
    assert fields == {"trip_id", "method", "extra"}


def test_max_amount_comes_from_context() -> None:
    data = {"trip_id": 1, "method": "CARD", "amount": Decimal("100.00")}
    assert validate_model(CreatePayment, data, max_amount=Decimal("100.00")).amount == Decimal(
        "100"
    )
    with pytest.raises(APIError):
        validate_model(CreatePayment, data, max_amount=Decimal("99.99"))


def test_key_hash_matches_the_guides_digest_query() -> None:
    key = IdempotencyKey.from_key("demo-client-1")
    assert key.key_hash == hashlib.sha256(b"demo-client-1").hexdigest()
    assert -(2**63) <= key.lock_id < 2**63
    assert key.lock_id == int.from_bytes(bytes.fromhex(key.key_hash)[:8], "big", signed=True)


def test_fingerprint_depends_on_route_params_and_body_only() -> None:
    a = fingerprint("POST", "/payments/{payment_id}/refunds", {"payment_id": 1}, {"amount": "5.00"})
    assert a == fingerprint(
        "POST",
        "/payments/{payment_id}/refunds",
        {"payment_id": 1},
        json.loads('{"amount": "5.00"}'),
    )
    assert a != fingerprint(
        "POST", "/payments/{payment_id}/refunds", {"payment_id": 2}, {"amount": "5.00"}
    )
    assert a != fingerprint("POST", "/payments", {"payment_id": 1}, {"amount": "5.00"})


@pytest.mark.parametrize(("raw", "trip"), [(b"101.0", 101), (b"1.01e2", 101), (b"101", 101)])
def test_an_integral_json_number_is_the_trip_id_json_schema_says(raw: bytes, trip: int) -> None:
    body = parse_json_object(b'{"trip_id": ' + raw + b', "method": "CARD", "amount": 1}')
    assert validate_model(CreatePayment, body).trip_id == trip


@pytest.mark.parametrize("raw", [b"101.5", b"1e19", b"1e400", b'"101"', b"true", b"0.0"])
def test_other_trip_ids_are_refused(raw: bytes) -> None:
    body = parse_json_object(b'{"trip_id": ' + raw + b', "method": "CARD", "amount": 1}')
    with pytest.raises(APIError):
        validate_model(CreatePayment, body)
