"""The gateway in real processes: a relay process (GATEWAY=stripe) finishes, with its gateway
worker, a charge that the API answered 202, and the charge's events reach the receiver; the
gateway's key and webhook secret never reach the relay's log or its metrics; `serve` and `relay`
refuse GATEWAY=stripe without a key in one line naming STRIPE_SECRET_KEY."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from payment_service.embedded import free_port
from payment_service.gateway.embedded import EmbeddedGateway
from tests.support.api import ApiFactory, exact_json, payment_body, post_json
from tests.support.commands import run_to_end
from tests.support.environment import clean_env
from tests.support.fault_proxy import FaultProxy, answer, matching
from tests.support.gateway import gateway_settings, read_ledger
from tests.support.processes import RelayLauncher, dump_logs
from tests.support.receiver import Receiver
from tests.support.waiting import wait_for

ProxyFactory = Callable[[str], Any]


async def test_the_relay_finishes_a_charge_the_api_left_and_keeps_the_secrets(
    api_factory: ApiFactory,
    proxy_factory: ProxyFactory,
    embedded_gateway: EmbeddedGateway,
    relays: RelayLauncher,
    receiver: Receiver,
    db: asyncpg.Connection,
) -> None:
    key = f"sk_test_canary{secrets.token_hex(8)}"  # the embedded gateway takes any sk_ key
    webhook_secret = f"whsec_canary{secrets.token_hex(8)}"
    proxy: FaultProxy = await proxy_factory(embedded_gateway.base_url)
    proxy.on(matching("POST", "/v1/payment_intents"), answer(500))
    api = await api_factory(
        **gateway_settings(
            proxy.base_url,
            gateway_timeout_seconds=1,
            stripe_secret_key=key,
            stripe_webhook_secret=webhook_secret,
        )
    )
    response = await post_json(api.client, "/payments", payment_body())
    assert response.status_code == 202, response.text
    payment = exact_json(response)
    metrics_port = free_port()

    relay = relays.start(
        **gateway_settings(
            embedded_gateway.base_url,
            stripe_secret_key=key,
            stripe_webhook_secret=webhook_secret,
        ),
        relay_metrics_port=metrics_port,
        log_level="DEBUG",
    )

    async def succeeded() -> bool:
        status = await db.fetchval(
            "SELECT status FROM payments WHERE payment_id = $1", payment["payment_id"]
        )
        return bool(status == "SUCCESS")

    try:
        await wait_for(succeeded, timeout=30, what="the relay's gateway worker to charge it")
        await wait_for(
            lambda: (
                {d.event_type for d in receiver.accepted()}
                >= {"payment.pending", "payment.succeeded"}
            ),
            timeout=30,
            what="the charge's events",
        )
    except AssertionError:
        raise AssertionError(dump_logs([relay])) from None
    ledger = (await read_ledger(embedded_gateway.base_url)).of_reference(payment["reference"])
    assert (len(ledger.intents), ledger.confirmed_intents, ledger.charged_intents) == (1, 1, 1)
    # Its scheduled reconciliation ran at start (GATEWAY_RECONCILE_INTERVAL), was stored, and its
    # count is exported (the session's gateway holds other tests' objects too: any count).
    stored = await wait_for(
        lambda: db.fetchval("SELECT differences::text FROM gateway_reconciliations"),
        timeout=30,
        what="the scheduled reconciliation",
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    async with httpx.AsyncClient(timeout=10) as client:

        async def scraped() -> str | None:
            text = (await client.get(metrics_url)).text
            return text if f"gateway_reconciliation_differences {stored}.0" in text else None

        metrics = await wait_for(scraped, timeout=30, what="the reconciliation's gauge")
    assert "gateway_review_payments 0.0" in metrics
    assert 'gateway_checks_total{kind="charge",result="decided"} 1.0' in metrics
    log = relay.log_path.read_text()
    for secret in (key, webhook_secret):
        assert secret not in log and secret not in metrics


@pytest.mark.parametrize("subcommand", ["serve", "relay"])
def test_a_gateway_without_a_key_is_one_line_naming_it(
    tmp_path: Path, database_url: str, subcommand: str
) -> None:
    env = clean_env(GATEWAY="stripe", DATABASE_URL=database_url, SERVICE_PORT=str(free_port()))
    result = run_to_end([subcommand], env, tmp_path, timeout=60)

    assert result.returncode == 2, result.stderr
    assert len(result.error_lines) == 1, result.stderr
    assert "STRIPE_SECRET_KEY is not set" in result.error_lines[0]
    assert "Traceback" not in result.stderr
