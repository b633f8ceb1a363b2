"""The admin API takes what the command line takes (one validation, in payment_service.endpoints),
pause and disable take a reason, enable after DISABLED names the gap, resume refuses a DISABLED
endpoint as the command line does, and removing an endpoint keeps its delivered history. The real
app over HTTP against a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from app.admin import EnabledEndpoint, EndpointRemoved, EventDeliveries
from tests.integration.conftest import ApiFactory
from tests.support.api import RunningApi, assert_problem, create_payment
from tests.support.endpoint_inputs import BAD_INPUTS, BadInput
from tests.support.environment import SECRET

ADMIN_TOKEN = "Zq3vR8xK1mWb7tYc0pLf5nHd2sGj9uAe-input-tests"  # strong: production checks it
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRIP = {"name": "trip", "url": "http://127.0.0.1:9/t", "event_types": ["payment.succeeded"]}


@pytest.fixture
async def admin_api(api_factory: ApiFactory) -> RunningApi:
    return await api_factory(admin_api_keys=(f"ops:{ADMIN_TOKEN}",))


@pytest.fixture
def admin(admin_api: RunningApi) -> httpx.AsyncClient:
    return admin_api.new_client(headers=ADMIN)


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda bad: bad.label)
async def test_add_refuses_what_the_command_line_refuses(
    admin: httpx.AsyncClient, db: asyncpg.Connection, bad: BadInput
) -> None:
    body: dict[str, Any] = {"name": "trip", "url": "http://127.0.0.1:9/t", bad.field: bad.value}
    response = await admin.post("/admin/endpoints", json=body)
    problem = assert_problem(response, 400, "VALIDATION_ERROR")
    assert [error["field"] for error in problem["errors"]] == [bad.field], problem
    assert bad.words in problem["errors"][0]["message"], problem
    assert "secret-pass" not in response.text, "a refusal never repeats a password"
    assert await db.fetchval("SELECT count(*) FROM endpoints WHERE name = 'trip'") == 0


async def test_update_refuses_an_unservable_url(admin: httpx.AsyncClient) -> None:
    for url in ("http://127.0.0.1:99999/x", "http://:8097/x", "http://[::1/x"):
        response = await admin.patch("/admin/endpoints/notification", json={"url": url})
        assert_problem(response, 400, "VALIDATION_ERROR")


async def test_production_refuses_a_loopback_address_unless_listed(
    api_factory: ApiFactory,
) -> None:
    production: dict[str, Any] = {
        "environment": "production",
        "api_keys": ("app:a-token-for-tests-only",),
        "callback_signing_secret": SECRET,
        "admin_api_keys": (f"ops:{ADMIN_TOKEN}",),
        "gateway": "none",
    }
    strict = (await api_factory(**production)).new_client(headers=ADMIN)
    for url in ("http://127.0.0.1:9/t", "http://[::1]:9/t", "http://localhost:9/t"):
        response = await strict.post("/admin/endpoints", json={**TRIP, "url": url})
        problem = assert_problem(response, 400, "VALIDATION_ERROR")
        assert problem["errors"][0]["field"] == "url"
        assert "a loopback address" in problem["errors"][0]["message"]
        changed = await strict.patch("/admin/endpoints/notification", json={"url": url})
        assert_problem(changed, 400, "VALIDATION_ERROR")
    listed = await api_factory(**production, endpoint_allowed_networks=("127.0.0.0/8",))
    added = await listed.new_client(headers=ADMIN).post("/admin/endpoints", json=TRIP)
    assert added.status_code == 201, added.text


async def test_pause_and_disable_take_a_reason(admin: httpx.AsyncClient) -> None:
    paused = await admin.post("/admin/endpoints/notification/pause", json={"reason": "upgrade"})
    assert paused.status_code == 200, paused.text
    assert (paused.json()["state"], paused.json()["state_reason"]) == ("PAUSED", "upgrade")
    resumed = await admin.post("/admin/endpoints/notification/resume")
    assert resumed.json()["state"] == "ACTIVE"
    bare = await admin.post("/admin/endpoints/notification/pause")  # no body, as before
    assert bare.json()["state_reason"] == "paused by admin:ops"
    empty = await admin.post("/admin/endpoints/notification/pause", json={})
    assert empty.json()["state_reason"] == "paused by admin:ops"
    for body in ({"reason": "a\x1b[2Jb"}, {"reason": "x" * 501}, {"reason": 7}, {"why": "x"}):
        refused = await admin.post("/admin/endpoints/notification/pause", json=body)
        assert_problem(refused, 400, "VALIDATION_ERROR")
    disabled = await admin.post(
        "/admin/endpoints/notification/disable", json={"reason": "receiver retired"}
    )
    assert (disabled.json()["state"], disabled.json()["state_reason"]) == (
        "DISABLED",
        "receiver retired",
    )
    # As on the command line: a DISABLED endpoint is enabled on purpose, not resumed.
    refused = await admin.post("/admin/endpoints/notification/resume")
    problem = assert_problem(refused, 409, "ENDPOINT_CONFLICT")
    assert "payment-service endpoints enable notification" in problem["detail"]


async def test_enable_after_disabled_names_the_gap(
    admin_api: RunningApi, admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    assert (await admin.post("/admin/endpoints", json=TRIP)).status_code == 201
    await create_payment(admin_api.client, method="CARD")
    assert (await admin.post("/admin/endpoints/trip/disable")).status_code == 200
    disabled_at = await db.fetchval("SELECT state_changed_at FROM endpoints WHERE name = 'trip'")
    for _ in range(3):
        await create_payment(admin_api.client, method="CARD")  # payment.succeeded: trip's type
    await create_payment(admin_api.client, method="UPI")  # payment.pending: not trip's

    enabled = await admin.post("/admin/endpoints/trip/enable")
    assert enabled.status_code == 200, enabled.text
    document = EnabledEndpoint.model_validate(enabled.json())
    assert document.state == "ACTIVE" and document.gap is not None
    assert (document.gap.disabled_at, document.gap.missed_events) == (disabled_at, 3)
    assert document.gap.replay_command == (
        f"payment-service outbox replay --endpoint trip --since {disabled_at.isoformat()}"
    )
    again = await admin.post("/admin/endpoints/trip/enable")
    assert again.json()["gap"] is None


async def test_remove_keeps_the_delivered_history(
    admin_api: RunningApi, admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    assert (await admin.post("/admin/endpoints", json=TRIP)).status_code == 201
    delivered = await create_payment(admin_api.client, method="CARD")
    await create_payment(admin_api.client, method="CARD")
    event_id = await db.fetchval(
        "SELECT event_id FROM outbox_events WHERE aggregate_id = $1", delivered["payment_id"]
    )
    await db.execute(
        "UPDATE deliveries SET status = 'DELIVERED', attempts = 1, delivered_at = now(),"
        ' attempt_log = \'[{"attempt": 1, "at": "2025-01-01T00:00:00+00:00",'
        ' "outcome": "DELIVERED", "status_code": 200, "error": null,'
        ' "duration_ms": 3}]\''
        " WHERE event_id = (SELECT id FROM outbox_events WHERE event_id = $1)",
        event_id,
    )

    removed = await admin.delete("/admin/endpoints/trip")
    assert removed.status_code == 200, removed.text
    assert EndpointRemoved.model_validate(removed.json()) == EndpointRemoved(
        name="trip", removed=True, undelivered_removed=1, delivered_kept=1
    )
    shown = await admin.get(f"/admin/events/{event_id}/deliveries")
    assert shown.status_code == 200, shown.text
    document = EventDeliveries.model_validate(shown.json())
    by_endpoint = {(d.endpoint, d.endpoint_removed): d for d in document.deliveries}
    assert set(by_endpoint) == {("notification", False), ("trip", True)}
    history = by_endpoint[("trip", True)]
    assert (history.status, history.attempt_log[0].status_code) == ("DELIVERED", 200)
