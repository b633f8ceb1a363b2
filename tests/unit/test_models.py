"""Pure parsing: exact money, JSON bodies, metadata limits, idempotency derivations."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

import pytest

from app.errors import APIError
from app.idempotency import IdempotencyKey, fingerprint
from app.models import (
    CreatePayment,
    parse_amount,
    parse_json_object,
    parse_metadata,
    validate_model,
)


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
        {"huge": Decimal("1e400")},
        [1],
    ):
        with pytest.raises(ValueError):
            parse_metadata(bad)


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
