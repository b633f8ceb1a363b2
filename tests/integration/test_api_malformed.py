"""No input, however malformed, gets a 5xx: broken JSON, NaN/Infinity, deep nesting,
odd unicode, wrong types, int64 overflow. Each is a 4xx problem document, and nothing is stored."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from tests.support.api import (
    assert_problem,
    assert_replay,
    create_payment,
    dumps_exact,
    exact_json,
    key_hash,
    new_key,
    payment_body,
)

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
    "metadata-number-out-of-range": raw(metadata=b'{"n": 1e1001}'),
}

GIANT_EXPONENT = b"1e99999999999999999999999999"
# Strict input: each of these was once accepted or a 500; each must be a 400.
STRICT: dict[str, bytes] = {
    "giant-exponent-amount": raw(amount=GIANT_EXPONENT),
    "giant-exponent-trip": raw(trip=GIANT_EXPONENT),
    "giant-exponent-metadata": raw(metadata=b'{"n": [' + GIANT_EXPONENT + b"]}"),
    "giant-negative-exponent": raw(metadata=b'{"n": 1e-99999999999999999999999999}'),
    "amount-exponent-number": raw(amount=b"1E+2"),
    "amount-exponent-fraction": raw(amount=b"1.5e1"),
    "amount-exponent-string": raw(amount=b'"1E+2"'),
    "amount-arabic-indic-digit": raw(amount=b'"\\u0663"'),
    "amount-fullwidth-digits": raw(amount='"\uff11\uff12"'.encode()),
    "amount-underscore": raw(amount=b'"1_000"'),
    "amount-plus-sign": raw(amount=b'"+10"'),
    "amount-trailing-newline": raw(amount=b'"10\\n"'),
    "duplicate-member": raw(key=b'"k-dup", "trip_id": 2', trip=b"1"),
    "duplicate-member-in-metadata": raw(metadata=b'{"a": 1, "a": 2}'),
}

# Odd but arguably valid: any answer but a 5xx.
UNUSUAL: dict[str, bytes] = {
    "metadata-huge-int": raw(trip=b"2", metadata=b'{"n": ' + b"9" * 400 + b"}"),
    "metadata-tiny-number": raw(trip=b"3", metadata=b'{"n": 1e-400}'),
    "metadata-huge-number": raw(trip=b"5", metadata=b'{"n": 1e400}'),
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


@pytest.mark.parametrize("body", list(STRICT.values()), ids=list(STRICT))
async def test_strict_input_is_400_and_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Connection, body: bytes
) -> None:
    response = await client.post(
        "/payments", content=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


async def test_a_duplicated_member_is_named(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/payments",
        content=STRICT["duplicate-member"],
        headers={"Content-Type": "application/json"},
    )
    assert '"trip_id"' in assert_problem(response, 400, "MALFORMED_JSON")["detail"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"trip_id": ', "line 1, column 13"),
        (raw(trip=b"9" * 5000), "digits"),
        (raw(key=b'"k-\xff"'), "UTF-8"),
        (raw(amount=GIANT_EXPONENT), "out of range"),
    ],
    ids=["truncated", "too-many-digits", "invalid-utf8", "giant-exponent"],
)
async def test_malformed_json_problems_do_not_echo_python_internals(
    client: httpx.AsyncClient, body: bytes, says: str
) -> None:
    response = await client.post(
        "/payments", content=body, headers={"Content-Type": "application/json"}
    )
    detail = assert_problem(response, 400, "MALFORMED_JSON")["detail"]
    assert says in detail, detail
    for internal in ("set_int_max_str_digits", "codec", "(char ", "Error", "<class", "Decimal"):
        assert internal not in detail, detail


async def test_metadata_numbers_round_trip_exactly(client: httpx.AsyncClient) -> None:
    metadata = (
        b'{"x": 0.1000000000000000055511151231257827, "big": 123456789012345678901234567890123,'
        b' "neg": -98765432109876543210.000000000000000000001, "list": [1.10, 2]}'
    )
    created = await client.post(
        "/payments", content=raw(key=b'"k-exact"', trip=b"7", metadata=metadata),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert created.status_code == 200, created.text
    fetched = await client.get(f"/payments/{exact_json(created)['payment_id']}")
    for response in (created, fetched):
        kept = exact_json(response)["metadata"]
        assert kept["x"] == Decimal("0.1000000000000000055511151231257827"), response.text
        assert kept["big"] == 123456789012345678901234567890123
        assert kept["neg"] == Decimal("-98765432109876543210.000000000000000000001")
        assert kept["list"] == [Decimal("1.10"), 2]


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
        ("trip_id", 101.5),
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


def _arabic_indic(number: int) -> str:
    return "".join(chr(0x0660 + int(digit)) for digit in str(number))


@pytest.mark.parametrize(
    "spell",
    [
        lambda pid: f"0{pid}",
        lambda pid: f"00{pid}",
        _arabic_indic,
        lambda pid: f"+{pid}",
        lambda pid: f"{pid + 2**64}",  # wraps to the same id in a careless int64 cast
        lambda pid: "9223372036854775808",
    ],
    ids=["leading-zero", "leading-zeros", "arabic-indic-digits", "plus", "wraps", "int64-overflow"],
)
async def test_payment_ids_are_ascii_digits_without_leading_zeros(
    client: httpx.AsyncClient, spell: Any
) -> None:
    payment = await create_payment(client, method="UPI")
    path = "/payments/" + quote(spell(payment["payment_id"]))
    for method, suffix in [("GET", ""), ("GET", "/refunds"), ("POST", "/refunds"),
                           ("POST", "/settlement")]:  # fmt: skip
        body = {"idempotency_key": new_key("id"), "status": "SUCCESS"} if method == "POST" else None
        if suffix == "/refunds" and body:
            del body["status"]
        response = await client.request(method, path + suffix, json=body)
        assert_problem(response, 404)
    assert (await client.get(f"/payments/{payment['payment_id']}")).json()["status"] == "PENDING"


async def test_two_idempotency_key_headers_are_400(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = payment_body()
    del body["idempotency_key"]
    response = await client.post(
        "/payments",
        content=dumps_exact(body).encode(),
        headers=[
            (b"Content-Type", b"application/json"),
            (b"Idempotency-Key", b"k-first"),
            (b"Idempotency-Key", b"k-second"),
        ],
    )
    assert_problem(response, 400, "IDEMPOTENCY_KEY_INVALID")
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


@pytest.mark.parametrize(
    ("header", "key"),
    [('"k-quoted-1"', "k-quoted-1"), ('"k-\\"q\\"-\\\\2"', 'k-"q"-\\2'), ("k-bare-3", "k-bare-3")],
    ids=["sf-string", "sf-string-escapes", "bare"],
)
async def test_structured_field_idempotency_key_is_the_key_without_quotes(
    client: httpx.AsyncClient, db: asyncpg.Connection, header: str, key: str
) -> None:
    body = payment_body()
    del body["idempotency_key"]
    sent = dumps_exact(body).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": header}
    first = await client.post("/payments", content=sent, headers=headers)
    assert first.status_code == 200, first.text
    assert await db.fetchval(
        "SELECT count(*) FROM idempotency_keys WHERE key_hash = $1", key_hash(key)
    ) == 1  # fmt: skip
    # The same key in the body is the same request: a replay, not a mismatch.
    again = await client.post(
        "/payments", content=dumps_exact({**body, "idempotency_key": key}).encode(), headers=headers
    )
    assert_replay(first, again)


@pytest.mark.parametrize("header", ['"k-open', '"k-"x"', '"k-\\n"', '"k\\', '"k-é"'])
async def test_malformed_quoted_idempotency_keys_are_400(
    client: httpx.AsyncClient, db: asyncpg.Connection, header: str
) -> None:
    body = payment_body()
    del body["idempotency_key"]
    response = await client.post(
        "/payments",
        content=dumps_exact(body).encode(),
        headers=[(b"Content-Type", b"application/json"),
                 (b"Idempotency-Key", header.encode("latin-1"))],
    )  # fmt: skip
    assert_problem(response, 400, "IDEMPOTENCY_KEY_INVALID")
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
