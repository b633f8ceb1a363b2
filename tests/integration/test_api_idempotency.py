"""Idempotency (DESIGN §5): one payment per key under concurrency, byte-identical replays, 422 on
reuse, 409 while in flight, expiry, the seed's key hash, and what is (not) stored."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.support import (
    RunningApi,
    advisory_lock_id,
    assert_problem,
    assert_replay,
    exact_json,
    new_key,
    payment_body,
    post_json,
    sha256_hex,
)


async def test_replay_is_byte_identical_and_marked(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = payment_body()
    first = await post_json(client, "/payments", body)
    assert first.status_code == 200, first.text

    for _ in range(3):
        assert_replay(first, await post_json(client, "/payments", body))
    assert await db.fetchval("SELECT count(*) FROM payments") == 1
    assert await db.fetchval("SELECT count(*) FROM outbox_events") == 1


async def test_replay_ignores_key_order_and_whitespace(client: httpx.AsyncClient) -> None:
    """The fingerprint is of the request's meaning, not of its bytes."""
    key = new_key()
    first = await client.post(
        "/payments",
        content=f'{{"idempotency_key": "{key}", "trip_id": 42, "method": "CARD", "amount": 10.50}}',
        headers={"Content-Type": "application/json"},
    )
    assert first.status_code == 200, first.text
    again = await client.post(
        "/payments",
        content=f'{{ "amount":10.50,"method":"CARD",\n "trip_id":42, "idempotency_key":"{key}"}}',
        headers={"Content-Type": "application/json"},
    )
    assert_replay(first, again)


async def test_key_hash_is_the_seed_digest(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    response = await post_json(client, "/payments", payment_body(idempotency_key="demo-client-1"))
    assert response.status_code == 200, response.text
    payment = exact_json(response)

    row = await db.fetchrow(
        "SELECT key_hash, request_path, response_status, response_data::text AS data, "
        "created_at, expires_at FROM idempotency_keys "
        "WHERE key_hash = encode(digest('demo-client-1','sha256'),'hex')"
    )
    assert row is not None, "the seed's encode(digest(key,'sha256'),'hex') must find the row"
    assert row["key_hash"] == sha256_hex("demo-client-1")
    assert row["response_status"] == 200
    assert json.loads(row["data"], parse_float=Decimal) == payment
    assert row["expires_at"] - row["created_at"] == timedelta(seconds=86400)
    hash_on_payment = await db.fetchval(
        "SELECT idempotency_hash FROM payments WHERE payment_id = $1", payment["payment_id"]
    )
    assert hash_on_payment == sha256_hex("demo-client-1")


async def test_concurrent_creates_with_one_key_make_one_payment(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = payment_body()
    responses = await asyncio.gather(*(post_json(client, "/payments", body) for _ in range(16)))

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 409}, [(r.status_code, r.text) for r in responses]
    successes = [r for r in responses if r.status_code == 200]
    assert successes, statuses
    assert len({r.content for r in successes}) == 1, "every 200 is the same answer, byte for byte"
    for response in responses:
        if response.status_code == 409:
            assert_problem(response, 409, "IDEMPOTENCY_KEY_IN_PROGRESS")
            assert response.headers.get("retry-after", "").isdigit()
    key_hash = sha256_hex(body["idempotency_key"])
    assert (
        await db.fetchval("SELECT count(*) FROM payments WHERE idempotency_hash = $1", key_hash)
        == 1
    )
    assert await db.fetchval("SELECT count(*) FROM payments") == 1
    assert await db.fetchval("SELECT count(*) FROM outbox_events") == 1
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 1


async def test_concurrent_creates_over_many_connections(
    api: RunningApi, db: asyncpg.Connection
) -> None:
    """The same race over 16 separate TCP connections (16 clients), several rounds."""
    clients = [api.new_client() for _ in range(16)]
    for _ in range(3):
        body = payment_body()
        responses = await asyncio.gather(*(post_json(c, "/payments", body) for c in clients))
        assert {r.status_code for r in responses} <= {200, 409}
        assert len({r.content for r in responses if r.status_code == 200}) == 1
        assert (
            await db.fetchval(
                "SELECT count(*) FROM payments WHERE idempotency_hash = $1",
                sha256_hex(body["idempotency_key"]),
            )
            == 1
        )


async def test_key_in_progress_is_409_with_retry_after(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = payment_body()
    async with db.transaction():
        await db.execute(
            "SELECT pg_advisory_xact_lock($1)", advisory_lock_id(body["idempotency_key"])
        )
        held = await asyncio.wait_for(post_json(client, "/payments", body), 10)
        assert_problem(held, 409, "IDEMPOTENCY_KEY_IN_PROGRESS")
        retry_after = held.headers.get("retry-after", "")
        assert retry_after.isdigit() and 0 < int(retry_after) <= 60, retry_after

    # Nothing was stored for the 409: the retry runs the operation.
    retried = await post_json(client, "/payments", body)
    assert retried.status_code == 200, retried.text
    assert retried.headers.get("idempotent-replayed") in (None, "false")
    assert await db.fetchval("SELECT count(*) FROM payments") == 1


async def test_refund_key_in_progress_is_409(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = exact_json(await post_json(client, "/payments", payment_body()))
    key = new_key("refund")
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", advisory_lock_id(key))
        held = await post_json(
            client, f"/payments/{payment['payment_id']}/refunds", {"idempotency_key": key}
        )
        assert_problem(held, 409, "IDEMPOTENCY_KEY_IN_PROGRESS")
        assert held.headers.get("retry-after")
    assert await db.fetchval("SELECT count(*) FROM payment_refunds") == 0


async def test_same_key_different_body_is_422_and_runs_nothing(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = payment_body(amount=Decimal("10.00"))
    assert (await post_json(client, "/payments", body)).status_code == 200

    for change in (
        {"amount": Decimal("10.01")},
        {"trip_id": body["trip_id"] + 1},
        {"method": "WALLET"},
        {"metadata": {"a": 1}},
        {"currency": "USD"},
    ):
        response = await post_json(client, "/payments", {**body, **change})
        assert_problem(response, 422, "IDEMPOTENCY_KEY_REUSED")
    assert await db.fetchval("SELECT count(*) FROM payments") == 1
    assert await db.fetchval("SELECT count(*) FROM outbox_events") == 1


async def test_same_key_on_another_endpoint_is_422(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = payment_body()
    payment = exact_json(await post_json(client, "/payments", body))

    refund = await post_json(
        client,
        f"/payments/{payment['payment_id']}/refunds",
        {"idempotency_key": body["idempotency_key"]},
    )
    assert_problem(refund, 422, "IDEMPOTENCY_KEY_REUSED")
    assert await db.fetchval("SELECT count(*) FROM payment_refunds") == 0
    assert await db.fetchval("SELECT status FROM payments") == "SUCCESS"


async def test_same_refund_key_on_another_payment_is_422(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    first = exact_json(await post_json(client, "/payments", payment_body()))
    second = exact_json(await post_json(client, "/payments", payment_body()))
    key = new_key("refund")
    body = {"idempotency_key": key, "amount": Decimal("1.00")}
    ok = await post_json(client, f"/payments/{first['payment_id']}/refunds", body)
    assert ok.status_code == 200, ok.text
    other = await post_json(client, f"/payments/{second['payment_id']}/refunds", body)
    assert_problem(other, 422, "IDEMPOTENCY_KEY_REUSED")
    assert await db.fetchval("SELECT count(*) FROM payment_refunds") == 1


async def test_header_key_works_and_is_the_same_key(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = payment_body()
    key = body.pop("idempotency_key")
    first = await post_json(client, "/payments", body, headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    assert (
        await db.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE key_hash = $1", sha256_hex(key)
        )
        == 1
    )

    # The same key in the body is the same request: a replay.
    assert_replay(first, await post_json(client, "/payments", {**body, "idempotency_key": key}))

    # Both, equal: fine.
    both = await post_json(
        client, "/payments", {**body, "idempotency_key": key}, headers={"Idempotency-Key": key}
    )
    assert both.content == first.content


async def test_header_and_body_keys_that_differ_are_400(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = payment_body()
    response = await post_json(client, "/payments", body, headers={"Idempotency-Key": "other-key"})
    assert_problem(response, 400)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0


@pytest.mark.parametrize(
    "path", ["/payments", "/payments/{id}/refunds", "/payments/{id}/settlement"]
)
async def test_missing_key_is_400_idempotency_key_missing(
    client: httpx.AsyncClient, db: asyncpg.Connection, path: str
) -> None:
    payment = exact_json(await post_json(client, "/payments", payment_body(method="UPI")))
    bodies: dict[str, dict[str, Any]] = {
        "/payments": {k: v for k, v in payment_body().items() if k != "idempotency_key"},
        "/payments/{id}/refunds": {"amount": Decimal("1.00")},
        "/payments/{id}/settlement": {"status": "SUCCESS"},
    }
    response = await post_json(client, path.format(id=payment["payment_id"]), bodies[path])
    assert_problem(response, 400, "IDEMPOTENCY_KEY_MISSING")
    assert await db.fetchval("SELECT count(*) FROM payments") == 1
    assert await db.fetchval("SELECT status FROM payments") == "PENDING"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "x" * 256,
        "tab\there",
        "nul\u0000",
        "newline\n",
        "rtl\u200fmark",
        "del\u007f",
        "\ud800",
        "🚕-trip-1",
        "ключ-1",
        12345,
        None,
        ["k"],
    ],
    ids=[
        "empty",
        "256-chars",
        "tab",
        "nul",
        "newline",
        "rtl-mark",
        "del",
        "lone-surrogate",
        "emoji",
        "cyrillic",
        "number",
        "null",
        "list",
    ],
)
async def test_invalid_keys_are_rejected(  # keys are 1-255 printable ASCII characters
    client: httpx.AsyncClient, db: asyncpg.Connection, key: Any
) -> None:
    response = await post_json(client, "/payments", payment_body(idempotency_key=key))
    assert 400 <= response.status_code < 500, response.text
    assert_problem(response, response.status_code)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


@pytest.mark.parametrize("key", ["x" * 255, "a", "key with spaces ~!@#$%^&*()", "trip-101-charge"])
async def test_printable_keys_up_to_255_are_accepted(
    client: httpx.AsyncClient, db: asyncpg.Connection, key: str
) -> None:
    response = await post_json(client, "/payments", payment_body(idempotency_key=key))
    assert response.status_code == 200, response.text
    assert (
        await db.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE key_hash = $1", sha256_hex(key)
        )
        == 1
    )


async def test_validation_error_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = payment_body()
    bad = await post_json(client, "/payments", {**body, "amount": Decimal("-5")})
    assert_problem(bad, 400, "VALIDATION_ERROR")
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0

    good = await post_json(client, "/payments", body)
    assert good.status_code == 200, good.text


async def test_business_error_is_stored_and_replayed(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = exact_json(
        await post_json(client, "/payments", payment_body(amount=Decimal("10.00")))
    )
    path = f"/payments/{payment['payment_id']}/refunds"
    body = {"idempotency_key": new_key("refund"), "amount": Decimal("10.01")}

    first = await post_json(client, path, body)
    assert_problem(first, 400, "REFUND_EXCEEDS_REMAINING")
    assert_replay(first, await post_json(client, path, body))
    assert (
        await db.fetchval(
            "SELECT response_status FROM idempotency_keys WHERE key_hash = $1",
            sha256_hex(body["idempotency_key"]),
        )
        == 400
    )


async def test_expired_key_is_new(api_factory: Any, db: asyncpg.Connection) -> None:
    api: RunningApi = await api_factory(idempotency_key_ttl=1)
    body = payment_body()
    first = await post_json(api.client, "/payments", body)
    assert first.status_code == 200, first.text
    key_hash = sha256_hex(body["idempotency_key"])
    ttl = await db.fetchval(
        "SELECT expires_at - created_at FROM idempotency_keys WHERE key_hash = $1", key_hash
    )
    assert ttl == timedelta(seconds=1)

    # Before expiry a different body is a reuse...
    changed = {**body, "trip_id": body["trip_id"] + 1}
    assert_problem(await post_json(api.client, "/payments", changed), 422, "IDEMPOTENCY_KEY_REUSED")

    await db.execute(
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 s' WHERE key_hash = $1",
        key_hash,
    )
    # ...after it, the key is new: a new payment, not a 422 and not a replay.
    second = await post_json(api.client, "/payments", changed)
    assert second.status_code == 200, second.text
    assert second.headers.get("idempotent-replayed") in (None, "false")
    assert exact_json(second)["payment_id"] != exact_json(first)["payment_id"]
    assert (
        await db.fetchval("SELECT count(*) FROM payments WHERE idempotency_hash = $1", key_hash)
        == 2
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE key_hash = $1 AND expires_at > now()",
            key_hash,
        )
        == 1
    )


async def test_expired_key_with_the_same_body_is_a_new_request(
    api_factory: Any, db: asyncpg.Connection
) -> None:
    """Not a replay of the old answer: the trip is already charged, so the new request says so."""
    api: RunningApi = await api_factory(idempotency_key_ttl=1)
    body = payment_body()
    first = await post_json(api.client, "/payments", body)
    assert first.status_code == 200
    await db.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 s'")
    again = await post_json(api.client, "/payments", body)
    assert_problem(again, 409, "TRIP_ALREADY_CHARGED")
    assert again.headers.get("idempotent-replayed") in (None, "false")


async def test_keys_are_per_operation_not_per_client_bytes(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Keys are compared exactly as sent: case and whitespace make different keys."""
    first = await post_json(client, "/payments", payment_body(idempotency_key="Key-A"))
    second = await post_json(client, "/payments", payment_body(idempotency_key="key-a"))
    assert first.status_code == second.status_code == 200
    assert await db.fetchval("SELECT count(*) FROM payments") == 2
