"""What a caller's API key may do: `API_KEYS` entries with scopes (`name[scope+scope]:token`).

Payments are not owned per caller: the Trip Service charges, Support refunds, a Rider app reads,
each on any payment. Scopes limit what a key may do; a key without scopes may do everything, as
before scopes. A request outside its key's scopes is 403 INSUFFICIENT_SCOPE naming the scope it
needs (never the token), decided before the body is read, so nothing is stored.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from app import create_app
from app.hooks import ANY_SCOPE, scope_of
from payment_service.config import SCOPES, load_settings
from tests.integration.conftest import ApiFactory
from tests.support.api import (
    BASE_OVERRIDES,
    RunningApi,
    assert_problem,
    exact_json,
    new_key,
    payment_body,
    post_json,
)

KEYS = (
    "trip[payments:write+payments:read]:tok-trip",
    "support[refunds:write + payments:read]:tok-support",
    "rider[payments:read]:tok-rider",
    "reports[payments:read]:tok-reports",
    "ops:tok-ops",  # no scopes: everything, as every key could before scopes
)
TOKENS = {name: f"tok-{name}" for name in ("trip", "support", "rider", "reports", "ops")}

# Every payment route, the scope it needs, and a body that it would accept.
ROUTES = [
    ("POST", "/payments", "payments:write"),
    ("GET", "/payments", "payments:read"),
    ("GET", "/payments/{id}", "payments:read"),
    ("GET", "/payments/{id}/refunds", "payments:read"),
    ("POST", "/payments/{id}/refunds", "refunds:write"),
]
MAY = {
    "trip": {"payments:write", "payments:read"},
    "support": {"refunds:write", "payments:read"},
    "rider": {"payments:read"},
    "reports": {"payments:read"},
    "ops": set(SCOPES),
}


def auth(caller: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[caller]}"}


@pytest.fixture
async def scoped(api_factory: ApiFactory) -> RunningApi:
    return await api_factory(api_keys=KEYS)


async def send(client: httpx.AsyncClient, method: str, path: str, caller: str) -> httpx.Response:
    if method == "GET":
        return await client.get(path, headers=auth(caller))
    body: dict[str, Any] = {"idempotency_key": new_key("scope")}
    if path == "/payments":
        body = payment_body()
    return await post_json(client, path, body, headers=auth(caller))


async def test_each_key_may_do_what_its_scopes_say_and_nothing_else(scoped: RunningApi) -> None:
    client = scoped.client
    for caller, may in MAY.items():
        for method, template, scope in ROUTES:
            # a fresh payment, so that a refund can succeed
            paid = await post_json(client, "/payments", payment_body(), headers=auth("trip"))
            assert paid.status_code == 200, paid.text
            path = template.replace("{id}", str(exact_json(paid)["payment_id"]))
            response = await send(client, method, path, caller)
            if scope in may:
                assert response.status_code in (200, 202), (caller, method, path, response.text)
                continue
            problem = assert_problem(response, 403, "INSUFFICIENT_SCOPE")
            assert problem["required_scope"] == scope, problem
            assert f"'{scope}'" in problem["detail"], problem
            assert response.headers["www-authenticate"] == (
                f'Bearer realm="payment-service", error="insufficient_scope", scope="{scope}"'
            )
            shown = response.text + str(response.headers)
            assert not any(token in shown for token in TOKENS.values()), shown


async def test_a_refused_write_stores_nothing(scoped: RunningApi, db: asyncpg.Connection) -> None:
    body = payment_body()
    refused = await post_json(scoped.client, "/payments", body, headers=auth("rider"))
    assert_problem(refused, 403, "INSUFFICIENT_SCOPE")
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0
    # the same key is free for a caller that may write
    created = await post_json(scoped.client, "/payments", body, headers=auth("trip"))
    assert created.status_code == 200, created.text


async def test_callers_share_payments_what_they_may_do_differs(scoped: RunningApi) -> None:
    """The Trip Service charges, Support refunds that payment, a Rider app reads it: payments
    belong to the platform, not to the caller that made them."""
    client = scoped.client
    charged = await post_json(client, "/payments", payment_body(), headers=auth("trip"))
    assert charged.status_code == 200, charged.text
    payment_id = exact_json(charged)["payment_id"]
    refund = {"idempotency_key": new_key("refund"), "amount": "50.00"}
    refunded = await post_json(
        client, f"/payments/{payment_id}/refunds", refund, headers=auth("support")
    )
    assert refunded.status_code == 200, refunded.text
    read = await client.get(f"/payments/{payment_id}", headers=auth("rider"))
    assert read.status_code == 200, read.text
    assert exact_json(read)["status"] == "PARTIALLY_REFUNDED"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/payments/007", 404), ("DELETE", "/payments/1", 405), ("GET", "/payments/1/x", 404)],
)
async def test_no_such_route_is_404_or_405_whatever_the_key_may_do(
    scoped: RunningApi, method: str, path: str, status: int
) -> None:
    response = await scoped.client.request(method, path, headers=auth("rider"))
    assert_problem(response, status)


async def test_an_unknown_token_is_still_401_not_403(scoped: RunningApi) -> None:
    response = await scoped.client.get("/payments", headers={"Authorization": "Bearer nope"})
    assert_problem(response, 401, "UNAUTHORIZED")


def test_every_payment_route_declares_its_scope() -> None:
    """A route added under /payments without a scope would be closed to every key with scopes:
    each declares one (app.routes' `requires`)."""
    app = create_app(load_settings(**{**BASE_OVERRIDES, "api_keys": KEYS}))
    declared = {
        (method, rule.rule): scope_of(app.view_functions[rule.endpoint])
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/payments")
        for method in rule.methods or ()
        if method in ("GET", "POST")
    }
    expected = {
        (method, path.replace("{id}", "<payment_id:payment_id>")): scope
        for method, path, scope in ROUTES
    }
    # The old settlement route is gone (410) for every key, whatever its scopes.
    expected[("POST", "/payments/<payment_id:payment_id>/settlement")] = ANY_SCOPE
    assert declared == expected


async def test_the_gone_settlement_route_answers_410_to_any_key(scoped: RunningApi) -> None:
    for caller in TOKENS:
        response = await send(scoped.client, "POST", "/payments/1/settlement", caller)
        assert_problem(response, 410, "SETTLEMENT_MOVED")
    no_key = await post_json(scoped.client, "/payments/1/settlement", {})
    assert_problem(no_key, 401, "UNAUTHORIZED")


async def test_the_openapi_document_names_each_routes_scope_and_its_403(
    scoped: RunningApi,
) -> None:
    document = (await scoped.client.get("/openapi.json")).json()
    paths = document["paths"]
    for method, template, scope in ROUTES:
        operation = paths[template.replace("{id}", "{payment_id}")][method.lower()]
        assert operation["security"] == [{"bearer": [scope]}], (method, template)
        assert f"`{scope}`" in operation["description"], operation["description"]
        assert "application/problem+json" in operation["responses"]["403"]["content"]
