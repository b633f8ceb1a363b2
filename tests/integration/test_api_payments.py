"""POST /payments: the payment object, exact money, validation, one live charge per
trip, and the outbox event written with every state change."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from payment_service.vocabulary import PAYMENT_METHODS
from tests.support.api import (
    EVENT_FIELDS,
    PAYMENT_FIELDS,
    RunningApi,
    assert_problem,
    error_fields,
    exact_json,
    money_text,
    new_key,
    new_trip,
    payment_body,
    post_json,
)
from tests.support.database import outbox_rows

REFERENCE = re.compile(r"^PAY-(\d{8})-[0-9a-f]{8}$")


def assert_aware_iso(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None, f"{value!r} has no UTC offset"
    return parsed


async def test_create_answers_the_payment_object(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    body = payment_body(amount=Decimal("150.00"), metadata={"note": "local test"})
    response = await post_json(client, "/payments", body)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    payment = exact_json(response)
    assert set(payment) >= PAYMENT_FIELDS, payment
    assert isinstance(payment["payment_id"], int) and payment["payment_id"] >= 1
    assert payment["trip_id"] == body["trip_id"]
    assert payment["amount"] == Decimal("150.00")
    assert money_text(response.text, "amount") == ["150.00"]
    assert payment["currency"] == "INR"
    assert payment["method"] == "CARD"
    assert payment["status"] == "SUCCESS"
    assert payment["refunded_amount"] == Decimal("0.00")
    assert payment["metadata"] == {"note": "local test"}
    match = REFERENCE.match(payment["reference"])
    assert match, payment["reference"]
    assert_aware_iso(payment["created_at"])
    assert_aware_iso(payment["updated_at"])
    datetime.strptime(match[1], "%Y%m%d")  # the middle part is a real date

    row = await db.fetchrow("SELECT * FROM payments WHERE payment_id = $1", payment["payment_id"])
    assert row is not None
    assert row["amount"] == Decimal("150.00")
    assert row["status"] == "SUCCESS"
    assert row["reference"] == payment["reference"]
    assert row["trip_id"] == body["trip_id"]


async def test_references_are_unique(client: httpx.AsyncClient) -> None:
    payments = await asyncio.gather(
        *(post_json(client, "/payments", payment_body()) for _ in range(20))
    )
    references = {exact_json(r)["reference"] for r in payments}
    assert len(references) == 20


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        (Decimal("0.29"), "0.29"),
        (Decimal("1.15"), "1.15"),
        (Decimal("19.99"), "19.99"),
        ("12.34", "12.34"),
        (Decimal("0.01"), "0.01"),
        (Decimal("150"), "150.00"),
        (Decimal("1000000.00"), "1000000.00"),
        ("999999.99", "999999.99"),
        (Decimal("10.1"), "10.10"),
    ],
    ids=lambda value: str(value),
)
async def test_amounts_are_exact(
    client: httpx.AsyncClient, db: asyncpg.Connection, sent: Any, expected: str
) -> None:
    response = await post_json(client, "/payments", payment_body(amount=sent))

    assert response.status_code == 200, response.text
    assert money_text(response.text, "amount") == [expected], response.text
    payment = exact_json(response)
    stored = await db.fetchval(
        "SELECT amount::text FROM payments WHERE payment_id = $1", payment["payment_id"]
    )
    assert stored == expected
    event = (await outbox_rows(db, payment["payment_id"]))[0]
    assert event["payload"]["amount"] == Decimal(expected)


@pytest.mark.parametrize(
    "amount",
    [
        Decimal("1.234"),
        0,
        Decimal("0.00"),
        -1,
        Decimal("-0.01"),
        Decimal("1e308"),
        True,
        False,
        "abc",
        "NaN",
        "Infinity",
        "-Infinity",
        "12.345",
        "",
        None,
        [],
        {},
        "1,50",
        Decimal("1000000.01"),
        "10000000000.00",
        2**64,
    ],
    ids=lambda value: repr(value),
)
async def test_bad_amounts_are_validation_errors(
    client: httpx.AsyncClient, db: asyncpg.Connection, amount: Any
) -> None:
    response = await post_json(client, "/payments", payment_body(amount=amount))

    problem = assert_problem(response, 400, "VALIDATION_ERROR")
    assert "amount" in error_fields(problem), problem
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0


async def test_missing_amount_is_a_validation_error(client: httpx.AsyncClient) -> None:
    body = payment_body()
    del body["amount"]
    problem = assert_problem(await post_json(client, "/payments", body), 400, "VALIDATION_ERROR")
    assert "amount" in error_fields(problem)


async def test_max_payment_amount_setting_is_the_limit(api_factory: Any) -> None:
    api: RunningApi = await api_factory(max_payment_amount=Decimal("500.00"))
    ok = await post_json(api.client, "/payments", payment_body(amount=Decimal("500.00")))
    assert ok.status_code == 200, ok.text
    too_much = await post_json(api.client, "/payments", payment_body(amount=Decimal("500.01")))
    assert "amount" in error_fields(assert_problem(too_much, 400, "VALIDATION_ERROR"))


@pytest.mark.parametrize(
    "trip_id",
    [2**63, 2**64, -(2**63) - 1, 0, -1, Decimal("1.5"), "abc", None, True, [], 10**30],
    ids=lambda value: repr(value),
)
async def test_bad_trip_ids_are_validation_errors(client: httpx.AsyncClient, trip_id: Any) -> None:
    response = await post_json(client, "/payments", payment_body(trip_id=trip_id))
    problem = assert_problem(response, 400, "VALIDATION_ERROR")
    assert "trip_id" in error_fields(problem), problem


async def test_largest_int64_trip_id_is_accepted(client: httpx.AsyncClient) -> None:
    response = await post_json(client, "/payments", payment_body(trip_id=2**63 - 1))
    assert response.status_code == 200, response.text
    assert exact_json(response)["trip_id"] == 2**63 - 1


@pytest.mark.parametrize("method", PAYMENT_METHODS)
async def test_every_method_is_accepted(api_factory: Any, method: str) -> None:
    api: RunningApi = await api_factory(async_methods=())
    response = await post_json(api.client, "/payments", payment_body(method=method))
    assert response.status_code == 200, response.text
    assert exact_json(response)["method"] == method


@pytest.mark.parametrize("method", ["BITCOIN", "", None, 1, "CARD ", ["CARD"]])
async def test_unknown_methods_are_validation_errors(
    client: httpx.AsyncClient, method: Any
) -> None:
    problem = assert_problem(
        await post_json(client, "/payments", payment_body(method=method)), 400, "VALIDATION_ERROR"
    )
    assert "method" in error_fields(problem)


async def test_currency_defaults_and_is_kept(api_factory: Any) -> None:
    api: RunningApi = await api_factory(default_currency="EUR")
    default = await post_json(api.client, "/payments", payment_body())
    assert exact_json(default)["currency"] == "EUR"
    usd = await post_json(api.client, "/payments", payment_body(currency="USD"))
    assert usd.status_code == 200, usd.text
    assert exact_json(usd)["currency"] == "USD"


@pytest.mark.parametrize("currency", ["usd", "US", "USDX", "U$D", 840, ""])
async def test_bad_currencies_are_validation_errors(
    client: httpx.AsyncClient, currency: Any
) -> None:
    problem = assert_problem(
        await post_json(client, "/payments", payment_body(currency=currency)),
        400,
        "VALIDATION_ERROR",
    )
    assert "currency" in error_fields(problem)


@pytest.mark.parametrize(
    "metadata",
    [
        [1, 2],
        "note",
        1,
        {f"k{i}": i for i in range(51)},
        {"blob": "x" * 9000},
    ],
    ids=["list", "string", "number", "51-keys", "over-8KiB"],
)
async def test_bad_metadata_is_a_validation_error(client: httpx.AsyncClient, metadata: Any) -> None:
    problem = assert_problem(
        await post_json(client, "/payments", payment_body(metadata=metadata)),
        400,
        "VALIDATION_ERROR",
    )
    assert any(field.startswith("metadata") for field in error_fields(problem)), problem


async def test_metadata_limits_are_inclusive(client: httpx.AsyncClient) -> None:
    fifty = {f"k{i}": i for i in range(50)}
    response = await post_json(client, "/payments", payment_body(metadata=fifty))
    assert response.status_code == 200, response.text
    assert exact_json(response)["metadata"] == fifty


async def test_metadata_round_trips_unicode_and_nesting(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    metadata = {
        "emoji": "🚕💳",
        "rtl": "\u200f\u05e9\u05dc\u05d5\u05dd\u200e",
        "nested": {"list": [1, "two", None, True, {"x": Decimal("1.5")}]},
        "ünïcödé-key": "ok",
    }
    response = await post_json(client, "/payments", payment_body(metadata=metadata))
    assert response.status_code == 200, response.text
    payment = exact_json(response)
    assert payment["metadata"] == metadata
    fetched = await client.get(f"/payments/{payment['payment_id']}")
    assert exact_json(fetched)["metadata"] == metadata


async def test_unknown_fields_are_rejected(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    response = await post_json(client, "/payments", payment_body(surprise=1))
    problem = assert_problem(response, 400, "VALIDATION_ERROR")
    assert "surprise" in " ".join(error_fields(problem)), problem
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


@pytest.mark.parametrize("missing", ["trip_id", "method"])
async def test_required_fields(client: httpx.AsyncClient, missing: str) -> None:
    body = payment_body()
    del body[missing]
    problem = assert_problem(await post_json(client, "/payments", body), 400, "VALIDATION_ERROR")
    assert missing in error_fields(problem)


async def test_second_charge_for_a_trip_names_the_first_payment(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    trip = new_trip()
    first = await post_json(client, "/payments", payment_body(trip_id=trip))
    assert first.status_code == 200, first.text
    payment_id = exact_json(first)["payment_id"]

    second = await post_json(client, "/payments", payment_body(trip_id=trip))

    problem = assert_problem(second, 409, "TRIP_ALREADY_CHARGED")
    assert problem.get("payment_id") == payment_id or str(payment_id) in problem["detail"], problem
    assert await db.fetchval("SELECT count(*) FROM payments WHERE trip_id = $1", trip) == 1


async def test_refunded_trip_still_counts_as_charged(client: httpx.AsyncClient) -> None:
    trip = new_trip()
    payment = exact_json(await post_json(client, "/payments", payment_body(trip_id=trip)))
    refund = await post_json(
        client, f"/payments/{payment['payment_id']}/refunds", {"idempotency_key": new_key("r")}
    )
    assert refund.status_code == 200, refund.text
    again = await post_json(client, "/payments", payment_body(trip_id=trip))
    assert_problem(again, 409, "TRIP_ALREADY_CHARGED")


async def test_concurrent_charges_of_one_trip_make_one_payment(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    trip = new_trip()
    responses = await asyncio.gather(
        *(post_json(client, "/payments", payment_body(trip_id=trip)) for _ in range(12))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 11, [(r.status_code, r.text) for r in responses]
    winner = next(exact_json(r) for r in responses if r.status_code == 200)
    for response in responses:
        if response.status_code == 409:
            assert_problem(response, 409, "TRIP_ALREADY_CHARGED")
    assert await db.fetchval("SELECT count(*) FROM payments WHERE trip_id = $1", trip) == 1
    assert await db.fetchval("SELECT count(*) FROM outbox_events") == 1
    assert (
        await db.fetchval("SELECT payment_id FROM payments WHERE trip_id = $1", trip)
        == winner["payment_id"]
    )


async def test_charge_writes_one_outbox_event_with_the_callback_body(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = exact_json(
        await post_json(client, "/payments", payment_body(amount=Decimal("19.99")))
    )

    events = await outbox_rows(db, payment["payment_id"])
    assert len(events) == 1
    event = events[0]
    assert event["event_type"] == "payment.succeeded"
    assert await db.fetchval(
        "SELECT array_agg(d.status) FROM deliveries AS d WHERE d.event_id = $1", event["id"]
    ) == ["PENDING"], "one delivery, to `notification`, waiting for the relay"
    payload = event["payload"]
    assert set(payload) >= EVENT_FIELDS, payload
    assert payload["event_id"] == str(event["event_id"])
    assert payload["event_type"] == "payment.succeeded"
    assert payload["payment_id"] == payment["payment_id"]
    assert payload["trip_id"] == payment["trip_id"]
    assert payload["amount"] == Decimal("19.99")
    assert payload["currency"] == "INR"
    assert payload["status"] == "SUCCESS"
    assert payload["reference"] == payment["reference"]
    assert_aware_iso(payload["occurred_at"])


async def test_charge_notifies_the_outbox_channel(
    client: httpx.AsyncClient, database_url: str
) -> None:
    listener = await asyncpg.connect(database_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener("outbox_events", lambda *args: received.put_nowait(args[2]))
        await post_json(client, "/payments", payment_body())
        channel = await asyncio.wait_for(received.get(), 10)
        assert channel == "outbox_events"
    finally:
        await listener.close()


async def test_every_committed_payment_has_its_event_and_key(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await asyncio.gather(*(post_json(client, "/payments", payment_body()) for _ in range(10)))
    orphans = await db.fetchval(
        """
        SELECT count(*) FROM payments p
        WHERE NOT EXISTS (SELECT 1 FROM outbox_events e WHERE e.aggregate_id = p.payment_id)
           OR NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.key_hash = p.idempotency_hash)
        """
    )
    assert orphans == 0
    assert await db.fetchval("SELECT count(*) FROM payments") == 10
