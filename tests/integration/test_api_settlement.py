"""Asynchronous payments without a gateway: 202 PENDING for ASYNC_METHODS, then an operator's
settlement SUCCESS or FAILED (POST /admin/payments/{id}/settlement, behind ADMIN_API_KEYS); only a
PENDING payment settles; one outbox event per state change. The old unauthenticated
POST /payments/{id}/settlement is gone: 410 with a pointer."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.conftest import ApiFactory
from tests.support.api import (
    ADMIN_AUTH,
    ADMIN_KEYS,
    EVENT_FIELDS,
    assert_problem,
    assert_replay,
    create_payment,
    error_fields,
    exact_json,
    new_key,
    payment_body,
    post_json,
    settle,
)
from tests.support.audit import audit_rows
from tests.support.database import outbox_rows
from tests.support.environment import new_signing_secret


@pytest.fixture
async def client(api_factory: ApiFactory) -> httpx.AsyncClient:
    """A client of an API with the tests' admin key (ADMIN_API_KEYS)."""
    return (await api_factory(admin_api_keys=ADMIN_KEYS)).client


async def test_async_method_is_accepted_pending(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    response = await post_json(
        client, "/payments", payment_body(method="UPI", amount=Decimal("42.50"))
    )

    assert response.status_code == 202, response.text
    body = exact_json(response)
    assert body["status"] == "PENDING"
    assert body["message"] == "Payment accepted for processing"
    assert isinstance(body["payment_id"], int), "a real payment_id, so clients can poll"
    assert body["amount"] == Decimal("42.50")
    assert body["method"] == "UPI"
    fetched = exact_json(await client.get(f"/payments/{body['payment_id']}"))
    assert fetched["status"] == "PENDING"

    events = await outbox_rows(db, body["payment_id"])
    assert [e["event_type"] for e in events] == ["payment.pending"]
    assert set(events[0]["payload"]) >= EVENT_FIELDS
    assert events[0]["payload"]["status"] == "PENDING"
    assert events[0]["payload"]["amount"] == Decimal("42.50")


async def test_pending_replay_is_byte_identical_202(client: httpx.AsyncClient) -> None:
    body = payment_body(method="UPI")
    first = await post_json(client, "/payments", body)
    assert first.status_code == 202, first.text
    assert_replay(first, await post_json(client, "/payments", body))


async def test_sync_methods_are_not_pending(client: httpx.AsyncClient) -> None:
    response = await post_json(client, "/payments", payment_body(method="CARD"))
    assert response.status_code == 200
    assert "message" not in exact_json(response)


async def test_settlement_success(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    pending = await create_payment(client, method="UPI", amount=Decimal("99.99"))

    response = await settle(client, pending["payment_id"], "SUCCESS", gateway_reference="gw-123")

    assert response.status_code == 200, response.text
    payment = exact_json(response)
    assert payment["payment_id"] == pending["payment_id"]
    assert payment["status"] == "SUCCESS"
    assert payment["amount"] == Decimal("99.99")
    assert payment["reference"] == pending["reference"]
    assert payment["failure_code"] is None
    row = await db.fetchrow(
        "SELECT status, gateway_reference FROM payments WHERE payment_id = $1",
        pending["payment_id"],
    )
    assert tuple(row) == ("SUCCESS", "gw-123")
    events = await outbox_rows(db, pending["payment_id"])
    assert [e["event_type"] for e in events] == ["payment.pending", "payment.succeeded"]
    assert set(events[1]["payload"]) >= EVENT_FIELDS
    assert events[1]["payload"]["status"] == "SUCCESS"
    assert events[1]["payload"]["event_id"] == str(events[1]["event_id"])

    # A settled payment is an ordinary one: refundable.
    refund = await post_json(
        client, f"/payments/{pending['payment_id']}/refunds", {"idempotency_key": new_key("r")}
    )
    assert refund.status_code == 200, refund.text


async def test_settlement_failed_frees_the_trip(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    pending = await create_payment(client, method="UPI")

    response = await settle(client, pending["payment_id"], "FAILED", failure_reason="declined")

    assert response.status_code == 200, response.text
    payment = exact_json(response)
    assert payment["status"] == "FAILED"
    assert (payment["failure_code"], payment["failure_message"]) == (
        "manual_settlement",
        "declined",
    )
    assert (
        await db.fetchval(
            "SELECT failure_reason FROM payments WHERE payment_id = $1", pending["payment_id"]
        )
        == "declined"
    )
    events = await outbox_rows(db, pending["payment_id"])
    assert [e["event_type"] for e in events] == ["payment.pending", "payment.failed"]
    assert set(events[1]["payload"]) >= EVENT_FIELDS
    assert events[1]["payload"]["status"] == "FAILED"

    # A FAILED payment is not a live charge: the trip may be charged again.
    retry = await post_json(client, "/payments", payment_body(trip_id=pending["trip_id"]))
    assert retry.status_code == 200, retry.text


async def test_only_pending_payments_settle(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    pending = await create_payment(client, method="UPI")
    card = await create_payment(client, method="CARD")
    assert (await settle(client, pending["payment_id"], "SUCCESS")).status_code == 200
    events_before = await db.fetchval("SELECT count(*) FROM outbox_events")

    assert_problem(
        await settle(client, pending["payment_id"], "FAILED"), 409, "PAYMENT_NOT_PENDING"
    )
    assert_problem(
        await settle(client, pending["payment_id"], "SUCCESS"), 409, "PAYMENT_NOT_PENDING"
    )

    assert_problem(await settle(client, card["payment_id"], "SUCCESS"), 409, "PAYMENT_NOT_PENDING")
    assert await db.fetchval("SELECT count(*) FROM outbox_events") == events_before
    assert (
        await db.fetchval(
            "SELECT status FROM payments WHERE payment_id = $1", pending["payment_id"]
        )
        == "SUCCESS"
    )


async def test_settlement_replay(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    pending = await create_payment(client, method="UPI")
    body = {"idempotency_key": new_key("settle"), "status": "SUCCESS"}
    path = f"/admin/payments/{pending['payment_id']}/settlement"
    first = await post_json(client, path, body, headers=ADMIN_AUTH)
    assert first.status_code == 200, first.text
    assert_replay(first, await post_json(client, path, body, headers=ADMIN_AUTH))
    assert await db.fetchval("SELECT count(*) FROM outbox_events") == 2


async def test_settlements_are_audited_once_in_their_transaction(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Each settlement is one `payment.settle` row naming the admin key, the status before and
    after, and the reason; a replay of its key, a refused one and a 404 record nothing."""
    won = await create_payment(client, method="UPI")
    lost = await create_payment(client, method="UPI")
    body = {
        "idempotency_key": new_key("settle"),
        "status": "SUCCESS",
        "gateway_reference": "gw-42",
        "reason": "the bank's statement shows it",
    }
    path = f"/admin/payments/{won['payment_id']}/settlement"
    first = await post_json(client, path, body, headers=ADMIN_AUTH)
    assert first.status_code == 200, first.text
    assert_replay(first, await post_json(client, path, body, headers=ADMIN_AUTH))
    failed = await settle(client, lost["payment_id"], "FAILED", failure_reason="<b>declined</b>")
    assert failed.status_code == 200, failed.text
    assert_problem(await settle(client, won["payment_id"], "FAILED"), 409, "PAYMENT_NOT_PENDING")
    assert_problem(await settle(client, 987654, "SUCCESS"), 404, "PAYMENT_NOT_FOUND")

    rows = await audit_rows(db, action="payment.settle")
    assert [(r["target_kind"], r["target_id"]) for r in rows] == [
        ("payment", str(won["payment_id"])),
        ("payment", str(lost["payment_id"])),
    ]
    assert {r["actor"] for r in rows} == {"admin:ops"}
    assert {r["origin"] for r in rows} == {"127.0.0.1"}
    assert [(json.loads(r["before"]), json.loads(r["after"])) for r in rows] == [
        ({"status": "PENDING"}, {"status": "SUCCESS", "gateway_reference": "gw-42"}),
        ({"status": "PENDING"}, {"status": "FAILED"}),
    ]
    assert [r["reason"] for r in rows] == ["the bank's statement shows it", "<b>declined</b>"]
    # GET /admin/audit shows them, filtered by target.
    listed = await client.get(
        "/admin/audit", params={"target": f"payment:{lost['payment_id']}"}, headers=ADMIN_AUTH
    )
    assert listed.status_code == 200, listed.text
    assert [e["action"] for e in listed.json()["data"]] == ["payment.settle"]


async def test_a_gateway_reference_like_a_secret_is_masked_in_the_audit_log(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    pending = await create_payment(client, method="UPI")
    secret = new_signing_secret()
    response = await settle(client, pending["payment_id"], "SUCCESS", gateway_reference=secret)
    assert response.status_code == 200, response.text
    (row,) = await audit_rows(db, action="payment.settle")
    assert secret not in row["after"] and json.loads(row["after"]) == {
        "status": "SUCCESS",
        "gateway_reference": "(not recorded: like a secret)",
    }


async def test_a_failure_reason_like_a_secret_is_masked_in_the_payment_and_its_event(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """The reason of a FAILED decision is the payment's failure message, in its document and in
    the payment.failed event every endpoint receives: masked there as in the audit log."""
    pending = await create_payment(client, method="UPI")
    secret = new_signing_secret()
    response = await settle(
        client, pending["payment_id"], "FAILED", failure_reason=f"bank said: {secret} (pasted)"
    )
    assert response.status_code == 200, response.text
    payment = exact_json(response)
    assert secret not in response.text
    assert payment["failure_message"] == "bank said: whsec_… (pasted)"
    stored = await db.fetchval(
        "SELECT failure_reason FROM payments WHERE payment_id = $1", pending["payment_id"]
    )
    assert stored == "bank said: whsec_… (pasted)"
    failed = (await outbox_rows(db, pending["payment_id"]))[-1]
    assert failed["event_type"] == "payment.failed"
    assert secret not in json.dumps(failed["payload"], default=str)
    (row,) = await audit_rows(db, action="payment.settle")
    assert secret not in row["reason"]


async def test_settlement_of_unknown_payment_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await settle(client, 987654, "SUCCESS"), 404, "PAYMENT_NOT_FOUND")


async def test_settlement_needs_the_admin_key(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    pending = await create_payment(client, method="UPI")
    body = {"idempotency_key": new_key("settle"), "status": "SUCCESS"}
    path = f"/admin/payments/{pending['payment_id']}/settlement"
    assert_problem(await post_json(client, path, body), 401, "UNAUTHORIZED")
    status = await db.fetchval(
        "SELECT status FROM payments WHERE payment_id = $1", pending["payment_id"]
    )
    assert status == "PENDING"


async def test_without_admin_keys_there_is_no_settlement(api_factory: ApiFactory) -> None:
    client = (await api_factory()).client
    pending = await create_payment(client, method="UPI")
    assert_problem(await settle(client, pending["payment_id"], "SUCCESS"), 404, "NOT_FOUND")


async def test_the_old_settlement_route_is_gone_with_a_pointer(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    pending = await create_payment(client, method="UPI")

    response = await post_json(
        client,
        f"/payments/{pending['payment_id']}/settlement",
        {"idempotency_key": new_key("settle"), "status": "SUCCESS"},
    )

    problem = assert_problem(response, 410, "SETTLEMENT_MOVED")
    assert problem["location"] == f"/admin/payments/{pending['payment_id']}/settlement"
    assert "/admin/payments/" in problem["detail"]
    assert (
        await db.fetchval(
            "SELECT status FROM payments WHERE payment_id = $1", pending["payment_id"]
        )
        == "PENDING"
    )
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 1, "only the charge's"


@pytest.mark.parametrize(
    "body",
    [
        {"status": "PENDING"},
        {"status": "success"},
        {},
        {"status": None},
        {"status": "SUCCESS", "x": 1},
        {"status": "FAILED", "failure_reason": 5},
        {"status": "SUCCESS", "gateway_reference": ["a"]},
    ],
    ids=["pending", "lowercase", "missing", "null", "unknown-field", "reason-number", "ref-list"],
)
async def test_bad_settlement_bodies(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    pending = await create_payment(client, method="UPI")
    problem = assert_problem(
        await post_json(
            client,
            f"/admin/payments/{pending['payment_id']}/settlement",
            {"idempotency_key": new_key("settle"), **body},
            headers=ADMIN_AUTH,
        ),
        400,
        "VALIDATION_ERROR",
    )
    assert error_fields(problem)
    fetched = exact_json(await client.get(f"/payments/{pending['payment_id']}"))
    assert fetched["status"] == "PENDING"
