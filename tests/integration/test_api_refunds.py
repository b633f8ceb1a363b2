"""POST /payments/{id}/refunds: partial and full refunds, never more than the payment
(also under concurrency), the refund events, and the refund errors."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.conftest import ApiFactory
from tests.support.api import (
    ADMIN_KEYS,
    EVENT_FIELDS,
    assert_problem,
    assert_replay,
    create_payment,
    error_fields,
    exact_json,
    money_text,
    new_key,
    post_json,
    settle,
)
from tests.support.database import outbox_rows

REFUND_FIELDS = {
    "payment_id",
    "refund_id",
    "refund_amount",
    "status",
    "timestamp",
    "payment_status",
    "refunded_amount",
    "remaining_amount",
}


async def refund(client: httpx.AsyncClient, payment_id: int | str, **body: Any) -> httpx.Response:
    return await post_json(
        client, f"/payments/{payment_id}/refunds", {"idempotency_key": new_key("refund"), **body}
    )


async def test_full_refund_without_amount(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = await create_payment(client, amount=Decimal("150.00"))

    response = await refund(client, payment["payment_id"], metadata={"reason": "test refund"})

    assert response.status_code == 200, response.text
    body = exact_json(response)
    assert set(body) >= REFUND_FIELDS, body
    assert body["payment_id"] == payment["payment_id"]
    assert isinstance(body["refund_id"], int)
    assert body["status"] == "REFUNDED"
    assert body["refund_amount"] == Decimal("150.00")
    assert money_text(response.text, "refund_amount") == ["150.00"]
    assert body["payment_status"] == "REFUNDED"
    assert body["refunded_amount"] == Decimal("150.00")
    assert body["remaining_amount"] == Decimal("0.00")
    row = await db.fetchrow("SELECT * FROM payment_refunds WHERE refund_id = $1", body["refund_id"])
    assert row["amount"] == Decimal("150.00")
    assert row["payment_id"] == payment["payment_id"]
    payment_row = await db.fetchrow(
        "SELECT status, refunded_amount FROM payments WHERE payment_id = $1", payment["payment_id"]
    )
    assert tuple(payment_row) == ("REFUNDED", Decimal("150.00"))


async def test_partial_refunds_then_the_rest(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = await create_payment(client, amount=Decimal("150.00"))
    pid = payment["payment_id"]

    first = exact_json(await refund(client, pid, amount=Decimal("50.00")))
    assert first["payment_status"] == "PARTIALLY_REFUNDED"
    assert first["refunded_amount"] == Decimal("50.00")
    assert first["remaining_amount"] == Decimal("100.00")

    second = exact_json(await refund(client, pid, amount="30.25"))
    assert second["refund_amount"] == Decimal("30.25")
    assert second["remaining_amount"] == Decimal("69.75")

    rest = await refund(client, pid)  # absent amount = everything not yet refunded
    assert rest.status_code == 200, rest.text
    last = exact_json(rest)
    assert last["refund_amount"] == Decimal("69.75")
    assert last["payment_status"] == "REFUNDED"
    assert last["remaining_amount"] == Decimal("0.00")

    fetched = exact_json(await client.get(f"/payments/{pid}"))
    assert fetched["status"] == "REFUNDED"
    assert fetched["refunded_amount"] == Decimal("150.00")
    assert await db.fetchval(
        "SELECT sum(amount) FROM payment_refunds WHERE payment_id = $1", pid
    ) == Decimal("150.00")


async def test_small_refunds_add_up_exactly(client: httpx.AsyncClient) -> None:
    payment = await create_payment(client, amount=Decimal("0.30"))
    for _ in range(3):
        assert (
            await refund(client, payment["payment_id"], amount=Decimal("0.1"))
        ).status_code == 200
    fetched = await client.get(f"/payments/{payment['payment_id']}")
    assert exact_json(fetched)["status"] == "REFUNDED"
    assert money_text(fetched.text, "refunded_amount") == ["0.30"]


async def test_refund_beyond_remaining_is_refused(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = await create_payment(client, amount=Decimal("100.00"))
    assert (await refund(client, payment["payment_id"], amount=Decimal("60.00"))).status_code == 200

    response = await refund(client, payment["payment_id"], amount=Decimal("40.01"))

    problem = assert_problem(response, 400, "REFUND_EXCEEDS_REMAINING")
    said = problem.get("remaining_amount")
    assert "40.00" in problem["detail"] or (
        said is not None and Decimal(str(said)) == Decimal("40.00")
    ), problem
    assert await db.fetchval("SELECT count(*) FROM payment_refunds") == 1
    assert await db.fetchval("SELECT refunded_amount FROM payments") == Decimal("60.00")


async def test_concurrent_refunds_never_exceed_the_payment(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = await create_payment(client, amount=Decimal("100.00"))
    pid = payment["payment_id"]

    responses = await asyncio.gather(
        *(refund(client, pid, amount=Decimal("20.00")) for _ in range(10))
    )

    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 5, [(r.status_code, r.text) for r in responses]
    for response in refused:
        # Before the last 20.00 commits the payment has too little left; after it, the payment is
        # REFUNDED and so no longer refundable: both are the right answer, depending on timing.
        code = assert_problem(response, 400)["code"]
        assert code in ("REFUND_EXCEEDS_REMAINING", "PAYMENT_NOT_REFUNDABLE"), response.text
    assert sorted(exact_json(r)["refunded_amount"] for r in ok) == [
        Decimal("20.00"),
        Decimal("40.00"),
        Decimal("60.00"),
        Decimal("80.00"),
        Decimal("100.00"),
    ]
    fetched = exact_json(await client.get(f"/payments/{pid}"))
    assert fetched["status"] == "REFUNDED"
    assert fetched["refunded_amount"] == Decimal("100.00")
    assert await db.fetchval("SELECT sum(amount) FROM payment_refunds") == Decimal("100.00")
    events = await outbox_rows(db, pid)
    assert [e["event_type"] for e in events] == ["payment.succeeded"] + ["payment.refunded"] * 5


async def test_each_refund_writes_one_refunded_event(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = await create_payment(client, amount=Decimal("80.00"))
    pid = payment["payment_id"]
    first = exact_json(await refund(client, pid, amount=Decimal("30.00")))
    second = exact_json(await refund(client, pid))

    events = await outbox_rows(db, pid)
    assert [e["event_type"] for e in events] == [
        "payment.succeeded",
        "payment.refunded",
        "payment.refunded",
    ]
    for event, answer, status in (
        (events[1], first, "PARTIALLY_REFUNDED"),
        (events[2], second, "REFUNDED"),
    ):
        payload = event["payload"]
        assert set(payload) >= EVENT_FIELDS | {"refund_id", "refund_amount"}
        assert payload["event_id"] == str(event["event_id"])
        assert payload["event_type"] == "payment.refunded"
        assert payload["payment_id"] == pid
        assert payload["trip_id"] == payment["trip_id"]
        assert payload["amount"] == Decimal("80.00")
        assert payload["currency"] == payment["currency"]
        assert payload["reference"] == payment["reference"]
        assert payload["status"] == status
        assert payload["refund_id"] == answer["refund_id"]
        assert payload["refund_amount"] == answer["refund_amount"]
        assert payload["occurred_at"]
    assert {e["aggregate_id"] for e in events} == {pid}


async def test_refund_replay_is_byte_identical(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = await create_payment(client, amount=Decimal("100.00"))
    body = {"idempotency_key": new_key("refund"), "amount": Decimal("25.00")}
    path = f"/payments/{payment['payment_id']}/refunds"
    first = await post_json(client, path, body)
    assert first.status_code == 200, first.text
    assert_replay(first, await post_json(client, path, body))
    assert await db.fetchval("SELECT count(*) FROM payment_refunds") == 1
    assert await db.fetchval("SELECT refunded_amount FROM payments") == Decimal("25.00")


async def test_refund_of_unknown_payment_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await refund(client, 999999), 404, "PAYMENT_NOT_FOUND")


@pytest.mark.parametrize("payment_id", ["abc", "0", "-1", str(2**63), "1.5"])
async def test_refund_of_nonsense_payment_id_is_4xx(
    client: httpx.AsyncClient, payment_id: str
) -> None:
    response = await refund(client, payment_id)
    assert response.status_code in (400, 404), response.text
    assert_problem(response, response.status_code)


async def test_refund_of_pending_payment_is_not_refundable(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    pending = await create_payment(client, method="UPI")
    assert pending["status"] == "PENDING"
    assert_problem(await refund(client, pending["payment_id"]), 400, "PAYMENT_NOT_REFUNDABLE")
    assert await db.fetchval("SELECT count(*) FROM payment_refunds") == 0


async def test_refund_of_failed_payment_is_not_refundable(api_factory: ApiFactory) -> None:
    client = (await api_factory(admin_api_keys=ADMIN_KEYS)).client
    pending = await create_payment(client, method="UPI")
    settled = await settle(client, pending["payment_id"], "FAILED", failure_reason="declined")
    assert settled.status_code == 200, settled.text
    assert_problem(await refund(client, pending["payment_id"]), 400, "PAYMENT_NOT_REFUNDABLE")


async def test_refund_of_fully_refunded_payment_is_not_refundable(
    client: httpx.AsyncClient,
) -> None:
    payment = await create_payment(client)
    assert (await refund(client, payment["payment_id"])).status_code == 200
    assert_problem(await refund(client, payment["payment_id"]), 400, "PAYMENT_NOT_REFUNDABLE")


@pytest.mark.parametrize(
    "amount",
    [0, Decimal("-1"), Decimal("1.234"), "abc", "NaN", True, Decimal("1e308"), []],
    ids=lambda value: repr(value),
)
async def test_bad_refund_amounts_are_validation_errors(
    client: httpx.AsyncClient, db: asyncpg.Connection, amount: Any
) -> None:
    payment = await create_payment(client)
    problem = assert_problem(
        await refund(client, payment["payment_id"], amount=amount), 400, "VALIDATION_ERROR"
    )
    assert "amount" in error_fields(problem)
    assert await db.fetchval("SELECT count(*) FROM payment_refunds") == 0


async def test_refund_rejects_unknown_fields(client: httpx.AsyncClient) -> None:
    payment = await create_payment(client)
    response = await refund(client, payment["payment_id"], reason="typo-for-metadata")
    assert_problem(response, 400, "VALIDATION_ERROR")


async def test_refunds_are_listed_on_the_payment(client: httpx.AsyncClient) -> None:
    payment = await create_payment(client, amount=Decimal("50.00"))
    pid = payment["payment_id"]
    r1 = exact_json(await refund(client, pid, amount=Decimal("10.00"), metadata={"n": 1}))
    r2 = exact_json(await refund(client, pid, amount=Decimal("15.50")))

    fetched = exact_json(await client.get(f"/payments/{pid}"))
    refunds = fetched["refunds"]
    assert [r["refund_id"] for r in refunds] == [r1["refund_id"], r2["refund_id"]]
    assert [r["amount"] if "amount" in r else r["refund_amount"] for r in refunds] == [
        Decimal("10.00"),
        Decimal("15.50"),
    ]
    assert fetched["refunded_amount"] == Decimal("25.50")
    assert fetched["status"] == "PARTIALLY_REFUNDED"
