"""The database goes away and comes back: /health says 503 "unhealthy", writes
answer 503 DATABASE_UNAVAILABLE with Retry-After at once (never hang, never 500), nothing
half-written is left, and the same running server recovers without a restart."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from payment_service.embedded import EmbeddedPostgres
from payment_service.migrations import migrate
from tests.support.api import (
    assert_problem,
    exact_json,
    key_hash,
    payment_body,
    post_json,
    running_api,
)
from tests.support.metrics import sample_value
from tests.support.waiting import wait_until

# An unavailable database must be reported fast: a client's own timeout is often a few seconds.
ANSWER_WITHIN_SECONDS = 5


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    # Not under pytest's basetemp: another pytest session on the machine re-tightens the
    # permissions of /tmp/pytest-of-<user>, which the server's unprivileged user must traverse.
    base = Path(tempfile.mkdtemp(prefix="payments-outage-pg-"))
    server = EmbeddedPostgres(
        base / "pg", settings=["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
    )
    server.start()
    try:
        yield server
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def own_database(own_postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    conn = await asyncpg.connect(own_postgres.dsn())
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield own_postgres.dsn()


async def timed(request: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await request
    return response, time.monotonic() - started


async def test_database_outage_and_recovery(
    own_postgres: EmbeddedPostgres, own_database: str
) -> None:
    async with running_api(own_database, db_pool_min=2, db_pool_max=4) as api:
        client = api.client
        before = await post_json(client, "/payments", payment_body())
        assert before.status_code == 200, before.text
        assert (await client.get("/health")).status_code == 200

        await asyncio.to_thread(own_postgres.stop, "fast")

        health, took = await timed(client.get("/health"))
        assert health.status_code == 503, health.text
        assert health.json()["status"] == "unhealthy"
        assert health.json().get("checks", {}).get("database") not in (None, "ok")
        assert took < ANSWER_WITHIN_SECONDS, f"/health took {took:.1f} s"
        assert (await client.get("/health/live")).status_code == 200, "the process still runs"

        down_body = payment_body()
        for request in (
            post_json(client, "/payments", down_body),
            post_json(client, "/payments", payment_body()),
            post_json(client, "/payments/1/refunds", {"idempotency_key": "refund-while-down"}),
        ):
            response, took = await timed(request)
            assert_problem(response, 503, "DATABASE_UNAVAILABLE")
            assert response.headers.get("retry-after", "").isdigit(), response.headers
            assert took < ANSWER_WITHIN_SECONDS, f"a write took {took:.1f} s to fail"
        read, took = await timed(client.get("/payments/1"))
        assert_problem(read, 503, "DATABASE_UNAVAILABLE")
        assert took < ANSWER_WITHIN_SECONDS
        # What the DatabaseUnavailableAnswers alert (deploy/prometheus/alerts.yml) counts.
        metrics = (await client.get("/metrics")).text
        assert sample_value(metrics, "payment_api_errors_total", code="DATABASE_UNAVAILABLE") == 4

        await asyncio.to_thread(own_postgres.start)

        async def healthy() -> bool:
            return (await client.get("/health")).status_code == 200

        await wait_until(healthy, timeout=30, interval=0.1)

        # The retry of the request that got a 503 is safe: it runs now, once.
        retried = await post_json(client, "/payments", down_body)
        assert retried.status_code == 200, retried.text
        assert retried.headers.get("idempotent-replayed") in (None, "false")
        fetched = await client.get(f"/payments/{exact_json(before)['payment_id']}")
        assert fetched.status_code == 200

    conn = await asyncpg.connect(own_database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM payments") == 2
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM payments WHERE idempotency_hash = $1",
                key_hash(down_body["idempotency_key"]),
            )
            == 1
        )
        assert await conn.fetchval("SELECT count(*) FROM outbox_events") == 2
        assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 2
    finally:
        await conn.close()
