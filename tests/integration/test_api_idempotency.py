"""Idempotency: one payment per key under concurrency, byte-identical replays, 422 on
reuse, 409 while in flight, expiry, the seed's key hash, what is (not) stored, and keys scoped
per caller."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.conftest import ApiFactory
from tests.support.api import (
    ADMIN_AUTH,
    ADMIN_KEYS,
    RunningApi,
    advisory_lock_id,
    assert_problem,
    assert_replay,
    exact_json,
    key_hash,
    new_key,
    payment_body,
    post_json,
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
    assert row["key_hash"] == key_hash("demo-client-1")
    assert row["response_status"] == 200
    assert json.loads(row["data"], parse_float=Decimal) == payment
    assert row["expires_at"] - row["created_at"] == timedelta(seconds=86400)
    hash_on_payment = await db.fetchval(
        "SELECT idempotency_hash FROM payments WHERE payment_id = $1", payment["payment_id"]
    )
    assert hash_on_payment == key_hash("demo-client-1")


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
    stored_hash = key_hash(body["idempotency_key"])
    assert (
        await db.fetchval("SELECT count(*) FROM payments WHERE idempotency_hash = $1", stored_hash)
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
                key_hash(body["idempotency_key"]),
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


async def test_a_metadata_number_and_the_same_digits_as_a_string_are_different_requests(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Metadata keeps numbers exact, and so does the fingerprint: 1.5 is not "1.5"."""
    body = payment_body(metadata={"tip": Decimal("1.5")})
    first = await post_json(client, "/payments", body)
    assert first.status_code == 200, first.text
    assert_replay(first, await post_json(client, "/payments", body))
    for other in ("1.5", Decimal("1.50")):
        response = await post_json(client, "/payments", {**body, "metadata": {"tip": other}})
        assert_problem(response, 422, "IDEMPOTENCY_KEY_REUSED")
    assert await db.fetchval("SELECT count(*) FROM payments") == 1


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
            "SELECT count(*) FROM idempotency_keys WHERE key_hash = $1", key_hash(key)
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
    "path", ["/payments", "/payments/{id}/refunds", "/admin/payments/{id}/settlement"]
)
async def test_missing_key_is_400_idempotency_key_missing(
    api_factory: ApiFactory, db: asyncpg.Connection, path: str
) -> None:
    client = (await api_factory(admin_api_keys=ADMIN_KEYS)).client
    payment = exact_json(await post_json(client, "/payments", payment_body(method="UPI")))
    bodies: dict[str, dict[str, Any]] = {
        "/payments": {k: v for k, v in payment_body().items() if k != "idempotency_key"},
        "/payments/{id}/refunds": {"amount": Decimal("1.00")},
        "/admin/payments/{id}/settlement": {"status": "SUCCESS"},
    }
    response = await post_json(
        client, path.format(id=payment["payment_id"]), bodies[path], headers=ADMIN_AUTH
    )
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
            "SELECT count(*) FROM idempotency_keys WHERE key_hash = $1", key_hash(key)
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
            key_hash(str(body["idempotency_key"])),
        )
        == 400
    )


async def test_expired_key_is_new(api_factory: Any, db: asyncpg.Connection) -> None:
    api: RunningApi = await api_factory(idempotency_key_ttl=1)
    body = payment_body()
    first = await post_json(api.client, "/payments", body)
    assert first.status_code == 200, first.text
    stored_hash = key_hash(body["idempotency_key"])
    ttl = await db.fetchval(
        "SELECT expires_at - created_at FROM idempotency_keys WHERE key_hash = $1", stored_hash
    )
    assert ttl == timedelta(seconds=1)

    # Before expiry a different body is a reuse...
    changed = {**body, "trip_id": body["trip_id"] + 1}
    assert_problem(await post_json(api.client, "/payments", changed), 422, "IDEMPOTENCY_KEY_REUSED")

    await db.execute(
        "UPDATE idempotency_keys SET expires_at = now() - interval '1 s' WHERE key_hash = $1",
        stored_hash,
    )
    # ...after it, the key is new: a new payment, not a 422 and not a replay.
    second = await post_json(api.client, "/payments", changed)
    assert second.status_code == 200, second.text
    assert second.headers.get("idempotent-replayed") in (None, "false")
    assert exact_json(second)["payment_id"] != exact_json(first)["payment_id"]
    assert (
        await db.fetchval("SELECT count(*) FROM payments WHERE idempotency_hash = $1", stored_hash)
        == 2
    )
    assert (
        await db.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE key_hash = $1 AND expires_at > now()",
            stored_hash,
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


# -- keys are scoped per caller -----------------------------------------
TWO_CALLERS = ("svc-a:tok-a", "svc-b:tok-b")
AS_A = {"Authorization": "Bearer tok-a"}
AS_B = {"Authorization": "Bearer tok-b"}


@pytest.fixture
async def callers(api_factory: Any) -> RunningApi:
    """An API with two named callers, svc-a (token tok-a) and svc-b (token tok-b)."""
    return await api_factory(api_keys=TWO_CALLERS)


async def test_two_callers_with_one_key_each_get_their_own_payment(
    callers: RunningApi, db: asyncpg.Connection
) -> None:
    """B's request with A's key is B's own: never A's stored answer, never a 422 against A's
    request, and A's own retry still replays A's answer (metadata included)."""
    key = new_key("shared")
    body_a = payment_body(idempotency_key=key, metadata={"owner": "svc-a"})
    body_b = payment_body(idempotency_key=key, amount=Decimal("99.00"), metadata={"owner": "b"})

    first_a = await post_json(callers.client, "/payments", body_a, headers=AS_A)
    first_b = await post_json(callers.client, "/payments", body_b, headers=AS_B)

    assert first_a.status_code == 200, first_a.text
    assert first_b.status_code == 200, first_b.text
    assert first_b.headers.get("idempotent-replayed") in (None, "false")
    payment_a, payment_b = exact_json(first_a), exact_json(first_b)
    assert payment_a["payment_id"] != payment_b["payment_id"]
    assert payment_b["metadata"] == {"owner": "b"} and payment_b["amount"] == Decimal("99.00")
    assert_replay(first_a, await post_json(callers.client, "/payments", body_a, headers=AS_A))
    assert_replay(first_b, await post_json(callers.client, "/payments", body_b, headers=AS_B))
    # Each scope still refuses its own key for another request.
    assert_problem(
        await post_json(callers.client, "/payments", body_b, headers=AS_A),
        422,
        "IDEMPOTENCY_KEY_REUSED",
    )
    rows = await db.fetch(
        "SELECT caller, response_data ->> 'payment_id' AS payment_id FROM idempotency_keys "
        "WHERE key_hash = encode(digest($1::text, 'sha256'), 'hex') ORDER BY caller",
        key,
    )
    assert [tuple(row) for row in rows] == [
        ("svc-a", str(payment_a["payment_id"])),
        ("svc-b", str(payment_b["payment_id"])),
    ], "the guide's query by key_hash finds the key's row of each caller"
    owners = await db.fetch(
        "SELECT caller FROM payments WHERE idempotency_hash = $1 ORDER BY payment_id",
        key_hash(key),
    )
    assert [row["caller"] for row in owners] == ["svc-a", "svc-b"]


async def test_a_key_first_used_by_another_caller_is_new_to_this_one(
    callers: RunningApi, db: asyncpg.Connection
) -> None:
    """The other order: B's different request came first; A's own first request with the key
    runs (no 422 because of B), and so does a refund with a key B used on another payment."""
    key = new_key("shared")
    first_b = await post_json(
        callers.client, "/payments", payment_body(idempotency_key=key), headers=AS_B
    )
    assert first_b.status_code == 200, first_b.text
    first_a = await post_json(
        callers.client, "/payments", payment_body(idempotency_key=key), headers=AS_A
    )
    assert first_a.status_code == 200, first_a.text
    assert first_a.headers.get("idempotent-replayed") in (None, "false")

    refund_key = new_key("shared-refund")
    for first, auth, amount in ((first_b, AS_B, "1.00"), (first_a, AS_A, "2.00")):
        refund = await post_json(
            callers.client,
            f"/payments/{exact_json(first)['payment_id']}/refunds",
            {"idempotency_key": refund_key, "amount": Decimal(amount)},
            headers=auth,
        )
        assert refund.status_code == 200, refund.text
        assert exact_json(refund)["refund_amount"] == Decimal(amount)
    assert await db.fetchval("SELECT count(*) FROM payment_refunds") == 2


async def test_two_callers_sending_the_same_request_with_one_key_each_run_it(
    callers: RunningApi, db: asyncpg.Connection
) -> None:
    """Same key, same body: two refunds, each caller's own, each replayed to its caller only."""
    payment = exact_json(
        await post_json(
            callers.client, "/payments", payment_body(amount=Decimal("10.00")), headers=AS_A
        )
    )
    path = f"/payments/{payment['payment_id']}/refunds"
    body = {"idempotency_key": new_key("same"), "amount": Decimal("3.00")}

    first_a = await post_json(callers.client, path, body, headers=AS_A)
    first_b = await post_json(callers.client, path, body, headers=AS_B)

    assert first_a.status_code == first_b.status_code == 200, (first_a.text, first_b.text)
    assert first_b.headers.get("idempotent-replayed") in (None, "false")
    assert exact_json(first_a)["refund_id"] != exact_json(first_b)["refund_id"]
    assert exact_json(first_b)["refunded_amount"] == Decimal("6.00")
    assert_replay(first_a, await post_json(callers.client, path, body, headers=AS_A))
    assert_replay(first_b, await post_json(callers.client, path, body, headers=AS_B))
    assert await db.fetchval("SELECT count(*) FROM payment_refunds") == 2


async def test_a_caller_in_flight_does_not_block_another_with_the_same_key(
    callers: RunningApi, db: asyncpg.Connection
) -> None:
    key = new_key("shared")
    async with db.transaction():  # svc-a's request with the key is in flight
        await db.execute("SELECT pg_advisory_xact_lock($1)", advisory_lock_id(key, "svc-a"))
        held = await post_json(
            callers.client, "/payments", payment_body(idempotency_key=key), headers=AS_A
        )
        assert_problem(held, 409, "IDEMPOTENCY_KEY_IN_PROGRESS")
        other = await post_json(
            callers.client, "/payments", payment_body(idempotency_key=key), headers=AS_B
        )
        assert other.status_code == 200, other.text


async def test_concurrent_callers_with_one_key_make_one_payment_each(
    callers: RunningApi, db: asyncpg.Connection
) -> None:
    key = new_key("race")
    bodies = {"a": payment_body(idempotency_key=key), "b": payment_body(idempotency_key=key)}
    responses = await asyncio.gather(
        *(
            post_json(callers.client, "/payments", bodies[who], headers=auth)
            for _ in range(8)
            for who, auth in (("a", AS_A), ("b", AS_B))
        )
    )
    assert {r.status_code for r in responses} <= {200, 409}, [r.text for r in responses]
    by_trip = {exact_json(r)["trip_id"]: r.content for r in responses if r.status_code == 200}
    assert set(by_trip) == {bodies["a"]["trip_id"], bodies["b"]["trip_id"]}
    for response in responses:
        if response.status_code == 200:  # each 200 is its caller's one payment, byte for byte
            assert response.content == by_trip[exact_json(response)["trip_id"]]
        else:
            assert_problem(response, 409, "IDEMPOTENCY_KEY_IN_PROGRESS")
    counts = await db.fetch(
        "SELECT caller, count(*) AS n FROM payments WHERE idempotency_hash = $1 GROUP BY caller",
        key_hash(key),
    )
    assert {row["caller"]: row["n"] for row in counts} == {"svc-a": 1, "svc-b": 1}


@pytest.mark.parametrize("api_keys", [(), ("k1", "k2")], ids=["auth-off", "bare-tokens"])
async def test_without_names_every_request_shares_one_scope(
    api_factory: Any, db: asyncpg.Connection, api_keys: tuple[str, ...]
) -> None:
    """Auth off, or today's bare tokens: one caller `default`, as before callers had names."""
    api: RunningApi = await api_factory(api_keys=api_keys)
    first_auth, second_auth = (
        ({"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}) if api_keys else ({}, {})
    )
    body = payment_body()
    first = await post_json(api.client, "/payments", body, headers=first_auth)
    assert first.status_code == 200, first.text
    other_client = api.new_client()
    assert_replay(first, await post_json(other_client, "/payments", body, headers=second_auth))
    assert_problem(
        await post_json(other_client, "/payments", {**body, "amount": "1.00"}, headers=second_auth),
        422,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert (
        await db.fetchval(
            "SELECT caller FROM idempotency_keys WHERE key_hash = $1",
            key_hash(body["idempotency_key"]),
        )
        == "default"
    )


async def test_the_access_log_names_the_caller_never_the_token(
    callers: RunningApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="payment_service.access")
    response = await post_json(callers.client, "/payments", payment_body(), headers=AS_B)
    assert response.status_code == 200, response.text
    unauthorised = await post_json(callers.client, "/payments", payment_body())
    assert unauthorised.status_code == 401

    lines = {
        record.request_id: record  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "payment_service.access"
    }
    assert lines[response.headers["x-request-id"]].caller == "svc-b"  # type: ignore[attr-defined]
    assert lines[unauthorised.headers["x-request-id"]].caller is None  # type: ignore[attr-defined]
    for record in lines.values():
        assert "tok-b" not in str(record.__dict__)
