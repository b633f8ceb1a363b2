"""The HTTP surface: bearer auth, body limits and media types, X-Request-ID,
problem+json everywhere, API_PREFIX, /health, /metrics, /openapi.json and /docs."""

from __future__ import annotations

import asyncio
import json
import re
import tracemalloc
import uuid
from decimal import Decimal
from typing import Any, cast

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
from tests.support.waiting import wait_for

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


def _streamed_body(*, chunks: int) -> tuple[Any, int]:
    """A body of `chunks` blocks of 64 KiB streamed from one buffer, and its size."""
    chunk, head, tail = b"x" * 65536, b'{"metadata": {"blob": "', b'"}}'

    async def stream():  # type: ignore[no-untyped-def]
        yield head
        for _ in range(chunks):
            yield chunk
        yield tail

    return stream(), len(head) + chunks * len(chunk) + len(tail)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_oversize_body_is_refused_without_buffering_it(
    client: httpx.AsyncClient, db: asyncpg.Connection, declared: bool
) -> None:
    # The server runs in this process, so what it keeps of a 3 MiB body shows in tracemalloc.
    stream, size = _streamed_body(chunks=60)
    headers = {"Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(size)
    tracemalloc.start()
    try:
        response = await client.post("/payments", content=stream, headers=headers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_problem(response, 413, "PAYLOAD_TOO_LARGE")  # still readable by the client
    assert peak < 2 * 1024 * 1024, f"{peak} bytes held while refusing a {size}-byte body"
    assert await db.fetchval("SELECT count(*) FROM payments") == 0


async def test_declared_oversize_body_is_refused_before_it_is_sent(api: RunningApi) -> None:
    # Only the headers and a few bytes of a declared 1 MiB body: the 413 needs no more of it.
    host, port = api.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /payments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1048576\r\n\r\n{"metadata": '
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 20)
    finally:
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 413"), status_line


def _requests_reading_a_body() -> int:
    """Tasks of the server (it runs in this process) whose handler is reading a request body."""
    return sum("json_body" in _awaiting(task) for task in asyncio.all_tasks())


def _awaiting(task: asyncio.Task[Any]) -> list[str]:
    """The names of the coroutines a task is suspended in, outermost first."""
    names, awaited = [], cast(Any, task.get_coro())
    while awaited is not None and hasattr(awaited, "cr_code"):
        names.append(awaited.cr_code.co_name)
        awaited = awaited.cr_await
    return names


async def test_a_client_gone_mid_body_leaves_no_request_behind(
    api: RunningApi, client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    # Half a body, then the client goes: the request reading it is cancelled, as Quart does.
    host, port = api.base_url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /payments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 200\r\n\r\n{"idempotency_key": "gone-'
    )
    await writer.drain()
    await wait_for(_requests_reading_a_body, timeout=10, what="the handler to read the body")
    writer.close()
    await writer.wait_closed()
    await wait_for(
        lambda: _requests_reading_a_body() == 0, timeout=10, what="the request to be cancelled"
    )
    response = await post_json(client, "/payments", payment_body())
    assert response.status_code == 200, response.text
    assert await db.fetchval("SELECT count(*) FROM payments") == 1


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


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/payments", {"GET", "HEAD", "POST"}),
        ("PUT", "/payments/1", {"GET", "HEAD"}),
        ("GET", "/payments/1/settlement", {"POST"}),
        ("POST", "/health", {"GET", "HEAD"}),
    ],
)
async def test_405_names_the_allowed_methods(
    client: httpx.AsyncClient, method: str, path: str, allowed: set[str]
) -> None:
    response = await client.request(method, path)
    assert_problem(response, 405, "METHOD_NOT_ALLOWED")
    assert {m.strip() for m in response.headers.get("allow", "").split(",")} == allowed


async def _raw_get(api: RunningApi, target: bytes, host: bytes) -> bytes:
    """The status line and headers of GET `target` sent as is (no client normalises it)."""
    address, port = api.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(address, int(port))
    try:
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "target", [b"//payments", b"/payments//1", b"//health", b"/health//live", b"///payments"]
)
async def test_empty_path_segments_never_redirect_to_the_host_header(
    api: RunningApi, target: bytes
) -> None:
    head = await _raw_get(api, target, host=b"attacker.invalid")
    assert head.startswith(b"HTTP/1.1 404"), head
    assert b"attacker.invalid" not in head and b"location:" not in head.lower(), head


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
    # The role of the node reached, and nothing that locates the database: the route is open.
    assert response.json() == {
        "status": "healthy",
        "service": "payment-service",
        "version": "1.0.0",
        "checks": {"database": "ok"},
        "database": {"role": "primary"},
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


async def test_openapi_document_says_what_is_enforced(api_factory: Any) -> None:
    api: RunningApi = await api_factory(api_keys=("k1",), max_payment_amount=Decimal("2500.50"))
    document = (await api.client.get("/openapi.json")).json()
    paths = document["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            if not path.startswith("/payments"):
                assert operation.get("security") == [], (path, method)
            if method != "post" or operation.get("deprecated"):
                continue  # the old settlement route is gone (410) and takes nothing
            assert operation["requestBody"]["required"] is True, (path, method)
            (header,) = [p for p in operation["parameters"] if p["in"] == "header"]
            assert header["name"] == "Idempotency-Key" and header["required"] is False
            assert re.fullmatch(header["schema"]["pattern"], '"k-\\"1\\""'), header
            assert not re.fullmatch(header["schema"]["pattern"], '"k-1'), header
    assert document["security"] == [{"bearer": []}]
    body = paths["/payments"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    number, text = body["properties"]["amount"]["anyOf"]
    assert number["maximum"] == 2500.5 and number["exclusiveMinimum"] == 0, number
    assert re.fullmatch(text["pattern"], "2500.50") and not re.fullmatch(text["pattern"], "2500.51")
    assert body["properties"]["trip_id"]["maximum"] == 2**63 - 1
    assert body["properties"]["metadata"]["anyOf"][0]["maxProperties"] == 50
    (parameter,) = paths["/payments/{payment_id}"]["get"]["parameters"]
    assert parameter["schema"] == {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}


async def test_docs_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "openapi.json" in response.text


async def test_docs_page_loads_everything_from_the_service_itself(api_factory: Any) -> None:
    """/docs works offline: every script, stylesheet and icon it names is served by the service
    (from the installed Swagger UI package), open even when API_KEYS is set; nothing else there."""
    api: RunningApi = await api_factory(api_keys=("k1",))
    page = (await api.client.get("/docs")).text

    sources = re.findall(r'(?:src|href)="([^"]*)"', page)

    assert "//" not in "".join(sources) and sources, sources  # no host named: same origin
    assert sorted(sources) == [
        "/docs/favicon-32x32.png",
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css",
    ]
    assert 'url: "/openapi.json"' in page
    for source, content_type, marker in [
        ("/docs/swagger-ui-bundle.js", "text/javascript", b"SwaggerUIBundle"),
        ("/docs/swagger-ui.css", "text/css", b".swagger-ui"),
        ("/docs/favicon-32x32.png", "image/png", b"\x89PNG"),
    ]:
        asset = await api.client.get(source)
        assert asset.status_code == 200, source
        assert asset.headers["content-type"].startswith(content_type), asset.headers
        assert marker in asset.content, source
        assert "max-age=86400" in asset.headers.get("cache-control", ""), asset.headers
    for other in ["/docs/index.html", "/docs/swagger-ui.js.map", "/docs/..%2Fpyproject.toml"]:
        assert (await api.client.get(other)).status_code == 404, other
