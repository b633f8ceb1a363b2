"""GET /payments/{id}, GET /payments/{id}/refunds and GET /payments: newest first,
keyset pagination with has_more, filters, and limit bounds."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ApiFactory
from tests.support.api import (
    ADMIN_KEYS,
    PAYMENT_FIELDS,
    assert_problem,
    create_payment,
    exact_json,
    new_key,
    new_trip,
    post_json,
    settle,
)


def refund_list(body: Any) -> list[dict[str, Any]]:
    """The refunds of GET /payments/{id}/refunds: `{"data": [...]}` (or a bare list)."""
    return body["data"] if isinstance(body, dict) else body


async def test_get_payment_with_its_refunds(client: httpx.AsyncClient) -> None:
    created = await create_payment(client, amount=Decimal("70.00"), metadata={"a": "b"})
    pid = created["payment_id"]

    fetched = await client.get(f"/payments/{pid}")
    assert fetched.status_code == 200
    assert fetched.headers["content-type"].startswith("application/json")
    body = exact_json(fetched)
    for field in PAYMENT_FIELDS:
        assert body[field] == created[field], field
    assert body["refunds"] == []

    refund = exact_json(
        await post_json(
            client,
            f"/payments/{pid}/refunds",
            {
                "idempotency_key": new_key("r"),
                "amount": Decimal("20.00"),
                "metadata": {"why": "late"},
            },
        )
    )
    body = exact_json(await client.get(f"/payments/{pid}"))
    assert len(body["refunds"]) == 1
    listed = body["refunds"][0]
    assert listed["refund_id"] == refund["refund_id"]
    assert listed["amount"] == Decimal("20.00")
    assert listed["metadata"] == {"why": "late"}
    assert body["status"] == "PARTIALLY_REFUNDED"
    assert body["updated_at"] >= created["updated_at"]


async def test_get_refunds(client: httpx.AsyncClient) -> None:
    payment = await create_payment(client, amount=Decimal("30.00"))
    pid = payment["payment_id"]
    empty = await client.get(f"/payments/{pid}/refunds")
    assert empty.status_code == 200
    assert refund_list(exact_json(empty)) == []

    ids = []
    for amount in ("5.00", "7.50"):
        answer = await post_json(
            client, f"/payments/{pid}/refunds", {"idempotency_key": new_key("r"), "amount": amount}
        )
        ids.append(exact_json(answer)["refund_id"])
    listed = refund_list(exact_json(await client.get(f"/payments/{pid}/refunds")))
    assert [r["refund_id"] for r in listed] == ids
    assert [r["amount"] for r in listed] == [Decimal("5.00"), Decimal("7.50")]
    assert all(r["payment_id"] == pid for r in listed)


@pytest.mark.parametrize("path", ["/payments/{id}", "/payments/{id}/refunds"])
async def test_unknown_payment_is_404(client: httpx.AsyncClient, path: str) -> None:
    assert_problem(await client.get(path.format(id=424242)), 404, "PAYMENT_NOT_FOUND")


@pytest.mark.parametrize("payment_id", ["abc", "-1", "0", str(2**63), str(10**40), "1e3", "%00"])
async def test_nonsense_payment_ids_are_4xx(client: httpx.AsyncClient, payment_id: str) -> None:
    response = await client.get(f"/payments/{payment_id}")
    assert response.status_code in (400, 404), response.text
    assert_problem(response, response.status_code)


async def test_list_is_newest_first_with_keyset_pages(client: httpx.AsyncClient) -> None:
    ids = [(await create_payment(client))["payment_id"] for _ in range(5)]
    newest_first = sorted(ids, reverse=True)

    page = exact_json(await client.get("/payments", params={"limit": 2}))
    assert set(page) >= {"data", "has_more"}
    assert [p["payment_id"] for p in page["data"]] == newest_first[:2]
    assert page["has_more"] is True

    page = exact_json(
        await client.get("/payments", params={"limit": 2, "starting_after": newest_first[1]})
    )
    assert [p["payment_id"] for p in page["data"]] == newest_first[2:4]
    assert page["has_more"] is True

    page = exact_json(
        await client.get("/payments", params={"limit": 2, "starting_after": newest_first[3]})
    )
    assert [p["payment_id"] for p in page["data"]] == newest_first[4:]
    assert page["has_more"] is False

    exact = exact_json(await client.get("/payments", params={"limit": 5}))
    assert len(exact["data"]) == 5
    assert exact["has_more"] is False


async def test_list_default_limit_is_20(client: httpx.AsyncClient) -> None:
    for _ in range(21):
        await create_payment(client)
    page = exact_json(await client.get("/payments"))
    assert len(page["data"]) == 20
    assert page["has_more"] is True


async def test_list_filters_by_trip_and_status(api_factory: ApiFactory) -> None:
    client = (await api_factory(admin_api_keys=ADMIN_KEYS)).client
    trip = new_trip()
    failed = await create_payment(client, trip_id=trip, method="UPI")
    settled = await settle(client, failed["payment_id"], "FAILED")
    assert settled.status_code == 200, settled.text
    charged = await create_payment(client, trip_id=trip, method="CARD")
    other = await create_payment(client)

    by_trip = exact_json(await client.get("/payments", params={"trip_id": trip}))
    assert [p["payment_id"] for p in by_trip["data"]] == [
        charged["payment_id"],
        failed["payment_id"],
    ]
    assert by_trip["has_more"] is False

    by_status = exact_json(await client.get("/payments", params={"status": "FAILED"}))
    assert [p["payment_id"] for p in by_status["data"]] == [failed["payment_id"]]

    both = exact_json(await client.get("/payments", params={"trip_id": trip, "status": "SUCCESS"}))
    assert [p["payment_id"] for p in both["data"]] == [charged["payment_id"]]

    success = exact_json(await client.get("/payments", params={"status": "SUCCESS"}))
    assert {p["payment_id"] for p in success["data"]} == {
        charged["payment_id"],
        other["payment_id"],
    }

    none = exact_json(await client.get("/payments", params={"trip_id": new_trip()}))
    assert none == {"data": [], "has_more": False} or (none["data"] == [] and not none["has_more"])


async def test_list_amounts_are_exact(client: httpx.AsyncClient) -> None:
    await create_payment(client, amount=Decimal("0.29"))
    page = await client.get("/payments")
    assert exact_json(page)["data"][0]["amount"] == Decimal("0.29")
    assert '"amount": 0.29' in page.text or '"amount":0.29' in page.text


@pytest.mark.parametrize("limit", ["1", "100"])
async def test_limit_bounds_accepted(client: httpx.AsyncClient, limit: str) -> None:
    response = await client.get("/payments", params={"limit": limit})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "-1"},
        {"limit": "abc"},
        {"limit": "1.5"},
        {"status": "BOGUS"},
        {"trip_id": "abc"},
        {"trip_id": str(2**63)},
        {"starting_after": "x"},
        {"unknown": "1"},
    ],
    ids=lambda params: "&".join(f"{k}={v}" for k, v in params.items()),
)
async def test_bad_list_queries_are_400(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    assert_problem(await client.get("/payments", params=params), 400, "VALIDATION_ERROR")
