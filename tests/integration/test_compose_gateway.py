"""docker-compose's `gateway` (deploy/gateway/start.py) without Docker: localstripe started as its
image starts it, with the API's webhook registered, so that a payment through the API is charged
there and its signed webhook reaches the API and is stored; SIGTERM stops it. (Here localstripe is
held to loopback by the embedded gateway's launcher; in its container it listens on the compose
network.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import asyncpg

from payment_service.embedded import free_port
from payment_service.gateway.embedded import LAUNCHER
from tests.support import REPO_ROOT
from tests.support.api import ApiFactory, payment_body, post_json
from tests.support.gateway import WEBHOOK_SECRET, gateway_settings, read_ledger
from tests.support.waiting import wait_for

START = REPO_ROOT / "deploy" / "gateway" / "start.py"
STOP_TIMEOUT_SECONDS = 15


def loopback_localstripe(folder: Path) -> Path:
    """A `localstripe` command for PATH that runs the real one held to 127.0.0.1."""
    folder.mkdir()
    command = folder / "localstripe"
    command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -P "{LAUNCHER}" localstripe "$@"\n')
    command.chmod(0o755)
    return folder


async def test_the_compose_gateway_charges_and_sends_the_apis_webhook(
    api_factory: ApiFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    api = await api_factory(**gateway_settings(base_url))
    env = {
        "PATH": f"{loopback_localstripe(tmp_path / 'bin')}:{os.environ.get('PATH', '/usr/bin')}",
        "GATEWAY_PORT": str(port),
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "GATEWAY_WEBHOOK_URL": api.url("/gateway/stripe/webhook"),
    }
    log = tmp_path / "gateway.log"
    with log.open("wb") as output:
        gateway = subprocess.Popen(
            [sys.executable, str(START)], env=env, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        await wait_for(
            lambda: "its events sent to" in log.read_text(), timeout=30, what="the gateway"
        )
        response = await post_json(api.client, "/payments", payment_body())
        assert response.status_code == 200, response.text
        payment = response.json()
        assert payment["status"] == "SUCCESS"
        assert payment["gateway_reference"].startswith("pi_")
        ledger = (await read_ledger(base_url)).of_reference(payment["reference"])
        assert ledger.charged_intents == 1
        # Its webhook was signed with the API's secret: verified and stored.
        await wait_for(
            lambda: db.fetchval(
                "SELECT count(*) FROM gateway_events WHERE payment_id = $1",
                payment["payment_id"],
            ),
            timeout=30,
            what="the charge's webhook at the API",
        )
    finally:
        gateway.send_signal(signal.SIGTERM)
        code = gateway.wait(STOP_TIMEOUT_SECONDS)
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM), log.read_text()


def test_without_its_settings_it_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(START)],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "gateway: set STRIPE_WEBHOOK_SECRET and GATEWAY_WEBHOOK_URL"
