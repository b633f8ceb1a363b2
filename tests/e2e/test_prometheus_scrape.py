"""A real Prometheus (Debian's package) scrapes the API (`serve --workers 2`) and a relay on
127.0.0.1 while the test drives them, and its HTTP API answers the values the test caused:
requests, payments, deliveries by endpoint, and what one paused endpoint has pending."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from payment_service import endpoints
from payment_service.embedded import free_port
from tests.support.audit import OPERATOR
from tests.support.environment import minimal_environment
from tests.support.processes import ApiProcess, RelayLauncher
from tests.support.prometheus import PrometheusServer, prometheus_binary
from tests.support.receiver import Receiver

PAYMENTS = 6


@pytest.fixture
async def api(tmp_path: Path, database_url: str) -> AsyncIterator[ApiProcess]:
    env = minimal_environment(database_url=database_url, environment="test", log_level="WARNING")
    process = ApiProcess("api", env, tmp_path, workers=2)
    process.start()
    try:
        await process.wait_ready()
        yield process
    finally:
        await process.terminate()


async def test_prometheus_scrapes_what_the_test_caused(
    tmp_path: Path,
    conn: asyncpg.Connection,
    receiver: Receiver,
    relays: RelayLauncher,
    api: ApiProcess,
) -> None:
    prometheus_binary("prometheus")  # skip (or fail under REQUIRE_PROMETHEUS=1) before starting
    # A second endpoint, paused: its deliveries wait, and its pending gauge says how many.
    await endpoints.insert_endpoint(
        conn, name="audit", url=receiver.base_url + "/audit", operator=OPERATOR
    )
    await endpoints.set_state(conn, "audit", "PAUSED", operator=OPERATOR)
    relay_port = free_port()
    relays.start(relay_metrics_port=relay_port, relay_housekeeping_interval=0.5)
    prometheus = PrometheusServer(
        tmp_path,
        {"payment-api": f"127.0.0.1:{api.port}", "payment-relay": f"127.0.0.1:{relay_port}"},
    )
    try:
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            await prometheus.wait_value(client, 'sum(up{job=~"payment-.*"})', 2)
            for n in range(PAYMENTS):
                # A connection each, so that both workers answer some of them.
                async with httpx.AsyncClient(base_url=api.base_url, trust_env=False) as one:
                    response = await one.post(
                        "/payments",
                        json={"idempotency_key": f"scrape-{n}", "trip_id": 700 + n,
                              "method": "CARD", "amount": "12.50"},
                    )  # fmt: skip
                    assert response.status_code == 200, response.text

            await prometheus.wait_value(client, "sum(payment_payments_created_total)", PAYMENTS)
            await prometheus.wait_value(
                client,
                'sum(payment_api_requests_total{route="/payments",method="POST",status="200"})',
                PAYMENTS,
            )
            await prometheus.wait_value(
                client,
                'sum(relay_endpoint_deliveries_total{endpoint="notification",outcome="delivered"})',
                PAYMENTS,
            )
            await prometheus.wait_value(
                client, 'outbox_endpoint_pending_deliveries{endpoint="audit"}', PAYMENTS
            )
            await prometheus.wait_value(
                client, 'outbox_endpoint_pending_deliveries{endpoint="notification"}', 0
            )
    finally:
        prometheus.stop()
    assert len(receiver.accepted_ids()) == PAYMENTS
