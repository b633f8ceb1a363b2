"""No input, however malformed, gets a 5xx (DESIGN §8): broken JSON, NaN/Infinity, deep nesting,
odd unicode, wrong types, int64 overflow. Each is a 4xx problem document, and nothing is stored."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.api import assert_problem, create_payment, exact_json, payment_body

VALID = json.dumps(payment_body(amount="10.00"))
DEEP = 5000


def raw(
    *, key: bytes = b'"k-raw"', trip: bytes = b"1", amount: bytes = b"1", metadata: bytes = b""
) -> bytes:
    """A POST /payments body written byte by byte, so it can hold what json.dumps never writes."""
    extra = b', "metadata": ' + metadata if metadata else b""
    return (
        b'{"idempotency_key": ' + key + b', "trip_id": ' + trip
        + b', "method": "CARD", "amount": ' + amount + extra + b"}"
    )  # fmt: skip


MALFORMED: dict[str, bytes] = {
    "truncated": b'{"trip_id": 1,',
    "trailing-garbage": VALID.encode() + b" x",
    "two-documents": VALID.encode() + VALID.encode(),
    "single-quotes": b"{'trip_id': 1}",
    "empty": b"",
    "whitespace": b"   \n",
    "null": b"null",
    "array": b"[]",
    "string": b'"payment"',
    "number": b"42",
    "nan-literal": raw(amount=b"NaN"),
    "infinity-literal": raw(amount=b"Infinity"),
    "minus-infinity": raw(amount=b"-Infinity"),
    "nan-in-metadata": raw(metadata=b'{"x": NaN}'),
    "deep-array-metadata": raw(metadata=b'{"x": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    "deep-object-metadata": raw(metadata=b'{"a":' * DEEP + b"1" + b"}" * DEEP),
    "deep-top-level": b"[" * DEEP + b"]" * DEEP,
    "invalid-utf8": raw(key=b'"k-\xff\xfe"'),
    "utf16-bom": '{"trip_id": 1}'.encode("utf-16"),
    "lone-surrogate-metadata": raw(metadata=b'{"x": "\\ud800"}'),
    "lone-surrogate-metadata-key": raw(metadata=b'{"\\udfff": 1}'),
    "nul-in-metadata": raw(metadata=b'{"x": "a\\u0000b"}'),
    "nul-in-metadata-key": raw(metadata=b'{"a\\u0000": 1}'),
    "nul-in-key": raw(key=b'"k\\u0000"'),
    "lone-surrogate-key": raw(key=b'"\\ud800"'),
    "rtl-key": raw(key='"k\u202e1"'.encode()),
    "huge-int-trip": raw(trip=b"9223372036854775808"),
    "giant-int-trip": raw(trip=b"9" * 5000),
    "giant-amount-digits": raw(amount=b"0." + b"1" * 5000),
    "huge-exponent": raw(amount=b"1e999999"),
    "tiny-exponent": raw(amount=b"1e-999999"),
    "metadata-huge-number": raw(metadata=b'{"n": 1e400}'),
}

# Odd but arguably valid: any answer but a 5xx.
UNUSUAL: dict[str, bytes] = {
    "duplicate-keys": raw(key=b'"k-dup", "trip_id": "x"', trip=b"1"),
    "metadata-huge-int": raw(trip=b"2", metadata=b'{"n": ' + b"9" * 400 + b"}"),
    "metadata-tiny-number": raw(trip=b"3", metadata=b'{"n": 1e-400}'),
    "metadata-empty-key": raw(trip=b"4", metadata=b'{"": ""}'),
    "bom-utf8": b"\xef\xbb\xbf" + json.dumps(payment_body(amount="10.00")).encode(),
}


@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_payment_bodies_are_4xx(
    client: httpx.AsyncClient, db: asyncpg.Connection, body: bytes
) -> None:
    response = await client.post(
        "/payments", content=body, headers={"Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert_problem(response, response.status_code)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0


@pytest.mark.parametrize("body", list(UNUSUAL.values()), ids=list(UNUSUAL))
async def test_unusual_payment_bodies_are_never_5xx(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post(
        "/payments", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert_problem(response, response.status_code)


@pytest.mark.parametrize(
    "name",
    [
        "truncated",
        "nan-literal",
        "deep-array-metadata",
        "deep-top-level",
        "lone-surrogate-metadata",
        "nul-in-metadata",
        "array",
    ],
)
@pytest.mark.parametrize("endpoint", ["refunds", "settlement"])
async def test_malformed_bodies_on_other_endpoints_are_4xx(
    client: httpx.AsyncClient, name: str, endpoint: str
) -> None:
    payment = await create_payment(client, method="UPI")
    response = await client.post(
        f"/payments/{payment['payment_id']}/{endpoint}",
        content=MALFORMED[name],
        headers={"Content-Type": "application/json"},
    )
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert_problem(response, response.status_code)


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/payments", content=b'{"trip_id": ', headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400)


@pytest.mark.parametrize(
    "metadata",
    [
        {"emoji": "💳🚕👩‍👩‍👧"},
        {"rtl": "\u200f\u202eabc\u202c"},
        {"zwj": "a\u200db"},
        {"bmp-edge": "\uffff\ufffd"},
        {"astral": "\U0001f600\U0010fffd"},
        {"é": "ñ"},
    ],
    ids=["emoji", "rtl-marks", "zwj", "bmp-edge", "astral", "latin"],
)
async def test_valid_unicode_metadata_round_trips(
    client: httpx.AsyncClient, metadata: dict[str, Any]
) -> None:
    response = await client.post(
        "/payments",
        content=json.dumps(payment_body(amount=5, metadata=metadata)).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert exact_json(response)["metadata"] == metadata


@pytest.mark.parametrize(
    "header",
    ["k\u00e9".encode("latin-1"), "🚕".encode(), b"\xff\xfe", b"a" * 300, b"a\tb"],
    ids=["latin1", "utf8-emoji", "invalid-bytes", "too-long", "tab"],
)
async def test_odd_idempotency_key_headers_are_never_5xx(
    client: httpx.AsyncClient, header: bytes
) -> None:
    body = payment_body(amount=5)
    del body["idempotency_key"]
    response = await client.post(
        "/payments",
        content=json.dumps(body).encode(),
        headers=[(b"Content-Type", b"application/json"), (b"Idempotency-Key", header)],
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_problem(response, response.status_code)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("trip_id", "101"),
        ("trip_id", 101.0),
        ("trip_id", {"$gt": 1}),
        ("method", 1),
        ("currency", None),
        ("metadata", None),
        ("amount", {"value": 1}),
        ("idempotency_key", True),
    ],
)
async def test_wrong_types_are_4xx(client: httpx.AsyncClient, field: str, value: Any) -> None:
    response = await client.post(
        "/payments",
        content=json.dumps({**payment_body(amount=5), field: value}).encode(),
        headers={"Content-Type": "application/json"},
    )
    # A JSON null for an optional field may mean "absent"; every other wrong type is refused.
    if value is None and response.status_code == 200:
        return
    assert 400 <= response.status_code < 500, response.text
    assert_problem(response, response.status_code)


@pytest.mark.parametrize(
    "query",
    [
        "limit=%00",
        "trip_id=" + "9" * 500,
        "status=" + "A" * 10000,
        "starting_after=-1",
        "limit=1&limit=2",
        "trip_id=%F0%9F%9A%95",
        "status=%FF",
    ],
)
async def test_odd_queries_are_never_5xx(client: httpx.AsyncClient, query: str) -> None:
    response = await client.get("/payments?" + query)
    assert response.status_code < 500, response.text
