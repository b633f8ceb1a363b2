"""`payment-service run` and the embedded gateway: started when GATEWAY=stripe and no key is
configured, on loopback only, its address and credentials given to the children, its webhook
pointed at the API and registered again when the supervisor restarts it, and stopped by Ctrl-C.
Not started when a key is configured or GATEWAY=none."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx
import pytest

from payment_service.embedded import free_port
from payment_service.gateway.embedded import EMBEDDED_API_KEY
from tests.e2e.test_cli_run import START_TIMEOUT_SECONDS, STOP_TIMEOUT_SECONDS, child_running
from tests.support.environment import clean_env
from tests.support.gateway import AUTH, listening_addresses, only_loopback
from tests.support.processes import Service, service
from tests.support.waiting import port_closed, wait_for

GATEWAY_LINE = re.compile(r"embedded gateway on (http://127\.0\.0\.1:(\d+))")
WEBHOOK_SENT = 'webhook "payment_intent.succeeded"'


def run_env(tmp_path: Path, database_url: str, port: int, **variables: str) -> dict[str, str]:
    """`run`'s environment with a gateway wanted (GATEWAY=stripe, its default), unless
    `variables` say otherwise."""
    return clean_env(
        **{
            "GATEWAY": "stripe",
            "DATABASE_URL": database_url,
            "SERVICE_PORT": str(port),
            "RELAY_METRICS_PORT": str(free_port()),
            "NOTIFICATION_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
            "PAYMENT_SERVICE_DATA_DIR": str(tmp_path / "data"),
        }
        | variables
    )


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


async def answers(base_url: str) -> bool:
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=5) as client:
        try:
            return (await client.get("/v1/events", params={"limit": 1})).status_code == 200
        except httpx.TransportError:
            return False


async def charge_at(base_url: str) -> None:
    """A charge made at the gateway directly: it sends a webhook a second later."""
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=10) as client:
        created = await client.post(
            "/v1/payment_intents",
            data={"amount": "100", "currency": "inr", "payment_method": "pm_card_visa"},
        )
        assert created.status_code == 200, created.text
        confirmed = await client.post(f"/v1/payment_intents/{created.json()['id']}/confirm")
        assert confirmed.json()["status"] == "succeeded"


async def test_run_starts_the_embedded_gateway_and_restarts_it(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    gateway_log = tmp_path / "data" / "gateway.log"
    with service(["run"], run_env(tmp_path, database_url, port), tmp_path, "run-gw") as run:
        await run.wait_http(f"http://127.0.0.1:{port}/health", timeout=START_TIMEOUT_SECONDS)
        found = GATEWAY_LINE.search(run.stderr())
        assert found, run.output()[-4000:]
        base_url, gateway_port = found[1], int(found[2])

        # On loopback only, answering the key the children were given.
        assert only_loopback(listening_addresses(gateway_port))
        api = await wait_for(lambda: child_running(run.pid, "serve"), timeout=30, what="the API")
        given = environ_of(api)
        assert given["STRIPE_API_BASE"] == base_url
        assert given["STRIPE_SECRET_KEY"] == EMBEDDED_API_KEY
        assert given["STRIPE_API_FLAVOUR"] == "localstripe"
        assert given["STRIPE_WEBHOOK_SECRET"].startswith("whsec_")
        assert given["STRIPE_WEBHOOK_SECRET"] not in run.output(), "the secret is never printed"
        # What another terminal exports to reach it (`reconcile`, `gateway review`).
        assert (
            f"export GATEWAY=stripe STRIPE_API_BASE={base_url} "
            f"STRIPE_SECRET_KEY={EMBEDDED_API_KEY} STRIPE_API_FLAVOUR=localstripe"
        ) in run.stderr()

        # Its webhook points at the API (whose route comes with the gateway's integration).
        await charge_at(base_url)
        await wait_for(
            lambda: WEBHOOK_SENT in gateway_log.read_text(), timeout=15, what="the first webhook"
        )

        # Killed, it is restarted on the same port with its webhook registered again.
        gateway = child_running(run.pid, "localstripe")
        assert gateway is not None
        os.kill(gateway, signal.SIGKILL)
        await wait_for(
            lambda: "gateway exited with code -9" in run.stderr(), timeout=30, what="the restart"
        )
        await wait_for(
            lambda: child_running(run.pid, "localstripe") not in (None, gateway),
            timeout=60,
            what="a new gateway process",
        )
        await wait_for(lambda: answers(base_url), timeout=60, what="the new gateway to answer")
        await charge_at(base_url)
        await wait_for(
            lambda: gateway_log.read_text().count(WEBHOOK_SENT) == 2,
            timeout=15,
            what="a webhook from the restarted gateway",
        )

        await stop(run)
        assert await port_closed(gateway_port)
        assert child_running(run.pid, "localstripe") is None


@pytest.mark.parametrize(
    "variables",
    [{"GATEWAY": "none"}, {"STRIPE_SECRET_KEY": "sk_test_configured"}],
    ids=["no-gateway", "key-configured"],
)
async def test_run_starts_no_embedded_gateway_when_not_wanted(
    tmp_path: Path, database_url: str, variables: dict[str, str]
) -> None:
    port = free_port()
    env = run_env(tmp_path, database_url, port, **variables)
    with service(["run"], env, tmp_path, "run-no-gw") as run:
        await run.wait_http(f"http://127.0.0.1:{port}/health", timeout=START_TIMEOUT_SECONDS)
        assert "embedded gateway" not in run.stderr()
        assert child_running(run.pid, "localstripe") is None
        await stop(run)


async def stop(run: Service) -> None:
    code = await run.stop(signal.SIGINT, timeout=STOP_TIMEOUT_SECONDS)
    assert code == 0, run.output()[-4000:]
    assert "Traceback" not in run.output()
