"""The HTTP surface (DESIGN §4): bearer auth, body limits and media types, X-Request-ID,
problem+json everywhere, API_PREFIX, /health, /metrics, /openapi.json and /docs."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.api import (
    RunningApi,
    assert_problem,
    dumps_exact,
    exact_json,
    payment_body,
    post_json,
)

OPEN_PATHS = ["/health", "/health/live", "/metrics", "/openapi.json", "/docs"]


# -- authentication ------------------------------------------------------------------------------
@pytest.fixture
async def secured(api_factory: Any) -> RunningApi:
    return await api_factory(api_keys=("k1", "k2"))


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong",
        "Bearer k1x",
        "Basic azE6",
        "k1",
        "Bearer k1 k2",
        "Token k1",
    ],
)
async def test_payments_routes_need_a_valid_bearer_key(
    secured: RunningApi, db: asyncpg.Connection, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    requests = [
        ("POST", "/payments"),
        ("GET", "/payments"),
        ("GET", "/payments/1"),
        ("GET", "/payments/1/refunds"),
        ("POST", "/payments/1/refunds"),
        ("POST", "/payments/1/settlement"),
    ]
    for method, path in requests:
        body = dumps_exact(payment_body()).encode() if method == "POST" else None
        response = await secured.client.request(
            method,
            path,
            content=body,
            headers={**headers, **({"Content-Type": "application/json"} if body else {})},
        )
        assert_problem(response, 401)
        # RFC 9110 §11.6.1: a 401 names the scheme the client should use.
        assert response.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


@pytest.mark.parametrize("key", ["k1", "k2"])
async def test_every_configured_key_is_accepted(secured: RunningApi, key: str) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    created = await post_json(secured.client, "/payments", payment_body(), headers=auth)
    assert created.status_code == 200, created.text
    fetched = await secured.client.get(
        f"/payments/{exact_json(created)['payment_id']}", headers=auth
    )
    assert fetched.status_code == 200


@pytest.mark.parametrize("path", OPEN_PATHS)
async def test_operational_routes_stay_open(secured: RunningApi, path: str) -> None:
    response = await secured.client.get(path)
    assert response.status_code == 200, (path, response.text)


async def test_no_api_keys_means_no_auth(client: httpx.AsyncClient) -> None:
    response = await post_json(client, "/payments", payment_body())
    assert response.status_code == 200


# -- body size and media type --------------------------------------------------------------------
async def test_3mb_body_is_413(client: httpx.AsyncClient, db: asyncpg.Connection) -> None:
    body = payment_body(metadata={"blob": "x" * (3 * 1024 * 1024)})
    response = await post_json(client, "/payments", body)
    assert_problem(response, 413)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


async def test_3mb_body_without_content_length_is_413(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        yield b'{"metadata": {"blob": "'
        for _ in range(48):
            yield b"x" * 65536
        yield b'"}}'

    try:
        response = await client.post(
            "/payments", content=chunks(), headers={"Content-Type": "application/json"}
        )
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        # The server may answer 413 and close before the client has finished sending.
        pass
    else:
        assert_problem(response, 413)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "text/json",
    ],
)
async def test_non_json_media_types_are_415(
    client: httpx.AsyncClient, db: asyncpg.Connection, content_type: str
) -> None:
    body = dumps_exact(payment_body()).encode()
    response = await client.post("/payments", content=body, headers={"Content-Type": content_type})
    assert_problem(response, 415)
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


async def test_missing_content_type_is_refused(client: httpx.AsyncClient) -> None:
    body = dumps_exact(payment_body()).encode()
    response = await client.post("/payments", content=body)
    assert response.status_code in (400, 415), response.text
    assert_problem(response, response.status_code)


async def test_json_with_charset_is_accepted(client: httpx.AsyncClient) -> None:
    body = dumps_exact(payment_body()).encode()
    response = await client.post(
        "/payments", content=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 200, response.text


# -- request ids and problem documents ----------------------------------------------------------
async def test_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    rid = f"test-{uuid.uuid4()}"
    for response in (
        await client.get("/health", headers={"X-Request-ID": rid}),
        await post_json(client, "/payments", payment_body(), headers={"X-Request-ID": rid}),
        await client.get("/payments/999999", headers={"X-Request-ID": rid}),
        await client.post(
            "/payments",
            content=b"{",
            headers={"X-Request-ID": rid, "Content-Type": "application/json"},
        ),
    ):
        assert response.headers.get("x-request-id") == rid


async def test_request_id_is_generated_and_unique(client: httpx.AsyncClient) -> None:
    ids = set()
    for _ in range(5):
        response = await client.get("/health/live")
        rid = response.headers.get("x-request-id")
        assert rid
        ids.add(rid)
    assert len(ids) == 5


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("DELETE", "/payments", 405),
        ("PUT", "/payments/1", 405),
        ("GET", "/payments/1/nothing", 404),
    ],
)
async def test_routing_errors_are_problems(
    client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    assert_problem(await client.request(method, path), status)


# -- API_PREFIX ----------------------------------------------------------------------------------
async def test_api_prefix_moves_the_payment_routes(api_factory: Any) -> None:
    api: RunningApi = await api_factory(api_prefix="/v1")
    created = await post_json(api.client, "/v1/payments", payment_body())
    assert created.status_code == 200, created.text
    pid = exact_json(created)["payment_id"]
    assert (await api.client.get(f"/v1/payments/{pid}")).status_code == 200
    assert (await api.client.get("/v1/payments")).status_code == 200
    refund = await post_json(api.client, f"/v1/payments/{pid}/refunds", {"idempotency_key": "r-v1"})
    assert refund.status_code == 200, refund.text

    assert_problem(await post_json(api.client, "/payments", payment_body()), 404)
    assert (await api.client.get(f"/payments/{pid}")).status_code == 404
    assert (await api.client.get("/health")).status_code == 200
    document = (await api.client.get("/openapi.json")).json()
    assert any(path.startswith("/v1/payments") for path in document["paths"]), document["paths"]


# -- health, metrics, docs -----------------------------------------------------------------------
async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "healthy",
        "service": "payment-service",
        "version": "1.0.0",
        "checks": {"database": "ok"},
    }
    live = await client.get("/health/live")
    assert live.status_code == 200


async def test_metrics_are_prometheus_text(client: httpx.AsyncClient) -> None:
    body = payment_body()
    await post_json(client, "/payments", body)
    await post_json(client, "/payments", body)  # a replay
    await post_json(client, "/payments", payment_body(trip_id=body["trip_id"]))  # a 409
    created = await client.get("/payments")
    payment_id = exact_json(created)["data"][0]["payment_id"]
    refund = await post_json(client, f"/payments/{payment_id}/refunds", {"idempotency_key": "m-r"})
    assert refund.status_code == 200, refund.text
    await client.get("/payments/999999")

    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# HELP" in text and "# TYPE" in text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    for line in samples:
        assert re.match(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? [-+0-9.eEInfNa]+( [0-9]+)?$", line), (
            line
        )
    counters = [line for line in samples if "_total{" in line or "_count{" in line]
    assert any('"200"' in line and "/payments" in line for line in counters), text
    assert any('"404"' in line for line in counters), text
    assert any("_bucket{" in line for line in samples), "latency histograms"
    assert re.search(r"^\S*payment\S*created\S* [1-9]", text, re.M), "payments created"
    assert re.search(r"^\S*replay\S* [1-9]", text, re.M), "idempotent replays"
    assert re.search(r"^\S*refund\S*created\S* [1-9]", text, re.M), "refunds created"
    assert re.search(r"^\S*(conflict|409)\S* [1-9]", text, re.M), "409s"


async def test_openapi_document(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.text)
    assert str(document["openapi"]).startswith("3.")
    paths = document["paths"]
    for path, method in [
        ("/payments", "post"),
        ("/payments", "get"),
        ("/payments/{payment_id}", "get"),
        ("/payments/{payment_id}/refunds", "post"),
        ("/payments/{payment_id}/refunds", "get"),
        ("/payments/{payment_id}/settlement", "post"),
    ]:
        assert method in paths.get(path, {}), (path, method, sorted(paths))


async def test_docs_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "openapi.json" in response.text
