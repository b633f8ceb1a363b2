"""The API in the tests: a real Hypercorn server on 127.0.0.1 and the contract's assertions.

The server runs in the test's own event loop (`hypercorn.asyncio.serve` with a shutdown trigger),
so a test can hold database locks, stop the database or inspect rows while requests are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypercorn.asyncio import serve
from hypercorn.config import Config

from app.idempotency import IdempotencyKey
from payment_service.config import DEFAULT_CALLER, Settings, load_settings

PROBLEM_KEYS = {"type", "title", "status", "detail", "code"}
STARTUP_TIMEOUT_SECONDS = 30
SHUTDOWN_TIMEOUT_SECONDS = 15

# Settings every test server starts from: nothing is read from the developer's environment or
# .env that could change behaviour (API_KEYS, API_PREFIX, ...); a test overrides what it needs.
# No payment gateway (payments are recorded as the request says): the tests of the gateway opt in
# (tests/support/gateway.py, `gateway_settings`).
BASE_OVERRIDES: dict[str, Any] = {
    "_env_file": None,
    "gateway": "none",
    "api_keys": (),
    "async_methods": ("UPI",),
    "api_prefix": "",
    "idempotency_key_ttl": 86400,
    "environment": "test",
    "callback_signing_secret": None,
    "db_pool_min": 1,
    "db_pool_max": 10,
    "default_currency": "INR",
    "max_payment_amount": Decimal("1000000.00"),
}

# Settling a payment by hand is an admin action (ADMIN_API_KEYS): the tests' admin key.
ADMIN_TOKEN = "admin-token-for-tests"
ADMIN_KEYS = (f"ops:{ADMIN_TOKEN}",)
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

_keys = itertools.count(1)
_trips = itertools.count(1001)


# The payment object every endpoint answers and the callback body.
PAYMENT_FIELDS = frozenset({
    "payment_id", "trip_id", "amount", "currency", "method", "status", "reference",
    "refunded_amount", "metadata", "created_at", "updated_at",
})  # fmt: skip
EVENT_FIELDS = frozenset({
    "event_id", "event_type", "occurred_at", "payment_id", "trip_id", "amount", "currency",
    "status", "reference", "sequence",
})  # fmt: skip


def new_key(prefix: str = "key") -> str:
    return f"{prefix}-{os.getpid()}-{next(_keys)}"


def new_trip() -> int:
    return next(_trips)


def payment_body(**fields: Any) -> dict[str, Any]:
    """A valid POST /payments body with a fresh key and trip; `fields` override or add."""
    body: dict[str, Any] = {
        "idempotency_key": new_key("pay"),
        "trip_id": new_trip(),
        "method": "CARD",
        "amount": Decimal("150.00"),
    }
    body.update(fields)
    return body


def dumps_exact(value: Any) -> str:
    """JSON text in which a Decimal is written as the number literal it is (never via float)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}: {dumps_exact(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(dumps_exact(v) for v in value) + "]"
    return json.dumps(value)


async def post_json(
    client: httpx.AsyncClient, path: str, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST `body` as exact JSON (Decimals as literals) with Content-Type application/json."""
    return await client.post(
        path,
        content=dumps_exact(body).encode("utf-8"),
        headers={"Content-Type": "application/json", **(headers or {})},
    )


def key_hash(key: str) -> str:
    """The hex SHA-256 the API stores for an idempotency key (app.idempotency computes it)."""
    return IdempotencyKey.from_key(key).key_hash


def advisory_lock_id(key: str, caller: str = DEFAULT_CALLER) -> int:
    """The int64 the API passes to pg_try_advisory_xact_lock for a caller's idempotency key."""
    return IdempotencyKey.from_key(key, caller).lock_id


def exact_json(response: httpx.Response) -> Any:
    """The body parsed with every JSON number with a fraction as a Decimal (never a float)."""
    return json.loads(response.text, parse_float=Decimal)


def money_text(response_text: str, field_name: str) -> list[str]:
    """Every literal JSON number written for `field_name` in the raw body text, as sent."""
    return re.findall(rf'"{re.escape(field_name)}"\s*:\s*(-?[0-9][0-9.eE+-]*)', response_text)


def assert_problem(
    response: httpx.Response, status: int, code: str | None = None
) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status (and code); return its body."""
    assert response.status_code == status, (response.status_code, response.text)
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith("application/problem+json"), content_type
    assert response.headers.get("x-request-id"), "every response carries X-Request-ID"
    body = response.json()
    assert isinstance(body, dict), body
    missing = PROBLEM_KEYS - set(body)
    assert not missing, f"problem body lacks {missing}: {body}"
    assert body["status"] == status, body
    assert isinstance(body["title"], str) and body["title"], body
    assert isinstance(body["detail"], str), body
    assert isinstance(body["type"], str) and body["type"], body
    if code is not None:
        assert body["code"] == code, body
    if body["code"] == "VALIDATION_ERROR":
        assert isinstance(body.get("errors"), list) and body["errors"], body
        for error in body["errors"]:
            assert isinstance(error.get("field"), str), error
            assert isinstance(error.get("message"), str) and error["message"], error
    else:
        assert "errors" not in body, f"'errors' is only for validation problems: {body}"
    text = response.text
    assert "Traceback" not in text and "asyncpg" not in text and "SELECT" not in text, text
    return body


def assert_replay(first: httpx.Response, again: httpx.Response) -> None:
    """`again` is the stored answer to `first`: same status, same bytes, marked as a replay."""
    assert first.headers.get("idempotent-replayed") in (None, "false"), first.headers
    assert again.status_code == first.status_code, (again.status_code, again.text)
    assert again.content == first.content
    assert again.headers.get("idempotent-replayed") == "true", again.headers
    assert again.headers["content-type"] == first.headers["content-type"]


def error_fields(problem: dict[str, Any]) -> set[str]:
    return {error["field"] for error in problem.get("errors", [])}


def _listening_socket_fd() -> tuple[int, int]:
    """A socket already bound and listening on 127.0.0.1 (no port race): (fd, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    fd = os.dup(sock.fileno())  # Hypercorn takes ownership of the duplicate and closes it.
    sock.close()
    return fd, port


@dataclass
class RunningApi:
    base_url: str
    settings: Settings
    client: httpx.AsyncClient
    extra_clients: list[httpx.AsyncClient] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path

    def new_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """Another client of this server (own connection pool), closed with the server."""
        kwargs.setdefault("timeout", 30)
        client = httpx.AsyncClient(base_url=self.base_url, **kwargs)
        self.extra_clients.append(client)
        return client


@contextlib.asynccontextmanager
async def running_api(
    database_url: str, *, customize: Callable[[Any], None] | None = None, **overrides: Any
) -> AsyncIterator[RunningApi]:
    """`app.create_app(settings)` served by Hypercorn on 127.0.0.1:<free port> until exit;
    `customize(app)` may add to the app first (a test-only route, say)."""
    from app import create_app

    settings = load_settings(**{**BASE_OVERRIDES, "database_url": database_url, **overrides})
    application = create_app(settings)
    if customize is not None:
        customize(application)
    fd, port = _listening_socket_fd()
    config = Config()
    config.bind = [f"fd://{fd}"]
    config.accesslog = None
    config.graceful_timeout = 3
    stop = asyncio.Event()
    task = asyncio.create_task(serve(application, config, shutdown_trigger=stop.wait))
    base_url = f"http://127.0.0.1:{port}"
    client = httpx.AsyncClient(base_url=base_url, timeout=30)
    api = RunningApi(base_url=base_url, settings=settings, client=client)
    try:
        await _wait_live(client, task)
        yield api
    finally:
        for extra in api.extra_clients:
            await extra.aclose()
        await client.aclose()
        stop.set()
        try:
            await asyncio.wait_for(task, SHUTDOWN_TIMEOUT_SECONDS)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def _wait_live(client: httpx.AsyncClient, task: asyncio.Task[None]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT_SECONDS
    while True:
        if task.done():
            task.result()  # raises the server's start-up error
            raise AssertionError("the server stopped before it answered /health/live")
        try:
            response = await client.get("/health/live", timeout=2)
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        if loop.time() > deadline:
            raise AssertionError(f"/health/live did not answer within {STARTUP_TIMEOUT_SECONDS} s")
        await asyncio.sleep(0.02)


async def create_payment(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    """POST a valid payment (fields override the defaults) and return the 200/202 body."""
    response = await post_json(client, "/payments", payment_body(**fields))
    assert response.status_code in (200, 202), response.text
    return exact_json(response)


async def settle(
    client: httpx.AsyncClient, payment_id: int | str, status: str, **fields: Any
) -> httpx.Response:
    """An operator's settlement of a PENDING payment (the API must have ADMIN_KEYS), with a fresh
    idempotency key; `fields` add to the body (gateway_reference, failure_reason, …)."""
    body = {"idempotency_key": new_key("settle"), "status": status, **fields}
    return await post_json(
        client, f"/admin/payments/{payment_id}/settlement", body, headers=ADMIN_AUTH
    )


ApiFactory = Callable[..., Awaitable[RunningApi]]


@pytest.fixture(name="api_factory")
async def api_factory_fixture(database_url: str) -> AsyncIterator[ApiFactory]:
    """`api_factory(**overrides)`: start the real app served on 127.0.0.1 against this test's
    database, with Settings overrides (lower-case field names); every server it started is shut
    down cleanly at the end of the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(*, database_url: str = database_url, **overrides: Any) -> RunningApi:
            return await stack.enter_async_context(running_api(database_url, **overrides))

        yield start
