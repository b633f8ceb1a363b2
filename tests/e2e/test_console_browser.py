"""The operator console in a real headless Chromium (tests/support/browser.py) against real
`payment-service serve --workers 2` and relay processes: an operator signs in, sees the endpoint
whose receiver fails with its breaker open at the top of the overview, pauses and resumes it with
confirmation, finds a payment's story by its reference, replays the dead deliveries after a
preview, and finds each action in the audit log; without a session or without the CSRF token
nothing is done; and what comes from outside (a receiver's answer, metadata, a reason) renders as
text. With the embedded gateway (a real localstripe process): the operator finds a payment's
story by its intent id, sees the gateway review queue first on the overview, and decides a
charge flagged for review, audited.

Few tests, one browser for the session. With CONSOLE_SCREENSHOTS=<folder> they save each page
there (`python -m tests.support.screenshots` writes docs/console/)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from payment_service.endpoints import select_endpoint
from payment_service.gateway.embedded import EmbeddedGateway
from tests.support.api import payment_body
from tests.support.browser import Browser
from tests.support.console import CONSOLE
from tests.support.environment import minimal_environment
from tests.support.fault_proxy import DROP_AFTER_FORWARD, FaultProxy, answer, matching
from tests.support.gateway import gateway_settings
from tests.support.processes import ApiProcess, RelayLauncher, RelayProcess, dump_logs
from tests.support.receiver import Delivery, Receiver, Reply, answer_ok, subscribed
from tests.support.waiting import wait_for

TOKEN = "browser-tests-admin-token-7Qf2Lp9X"
# What a failing receiver answers: markup that must show as text wherever the console shows it.
HOSTILE = '<script>window.pwned = "by the receiver"</script> overloaded'
REASON = '<script>window.pwned = "by a reason"</script> deploying'
METADATA = '<script>window.pwned = "by metadata"</script> rider note'


async def answer_hostile_500(_delivery: Delivery) -> Reply:
    return Reply(500, HOSTILE.encode())


@dataclass
class Stack:
    api: ApiProcess
    relay: RelayProcess
    receiver: Receiver
    conn: asyncpg.Connection

    def url(self, path: str) -> str:
        return self.api.base_url + CONSOLE + path

    async def pay(self, count: int) -> list[dict[str, Any]]:
        """`count` payments through the API, each with metadata carrying markup."""
        made = []
        async with httpx.AsyncClient(base_url=self.api.base_url, timeout=10) as client:
            for _ in range(count):
                body = payment_body(amount="25.00", metadata={"note": METADATA})
                response = await client.post("/payments", json=body)
                assert response.status_code == 200, response.text
                made.append(response.json())
        return made


@pytest.fixture
async def stack(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, receiver: Receiver,
    relays: RelayLauncher,
) -> AsyncIterator[Stack]:  # fmt: skip
    """`serve --workers 2` with an admin key (the console shares its sessions across workers)
    and a relay whose breaker opens after 3 failures and stays open for the test, and which gives
    up on a delivery after its first failed attempt."""
    env = minimal_environment(
        database_url=database_url,
        environment="test",
        log_level="WARNING",
        admin_api_keys=f"ops:{TOKEN}",
        gateway="none",
    )
    api = ApiProcess("api", env, tmp_path, workers=2)
    api.start()
    # A second endpoint whose receiver answers: it sorts first by name, the failing one by need.
    async with subscribed(conn, "analytics"):
        try:
            await api.wait_ready()
            relay = relays.start(
                endpoint_breaker_failures=3,
                endpoint_breaker_cooldown_seconds=600,
                relay_max_attempts=1,  # a failed attempt is the last: dead, to be replayed
            )
            yield Stack(api, relay, receiver, conn)
        finally:
            await api.terminate()


async def sign_in(browser: Browser, stack: Stack | GatewayStack) -> None:
    await browser.open(stack.url("/"))
    assert (await browser.url()).endswith(CONSOLE + "/sign-in")
    await browser.screenshot("sign-in")
    await browser.fill("#token", TOKEN)
    await browser.click("form button[type=submit]")
    assert (await browser.url()).endswith(CONSOLE + "/")
    assert "signed in with ops" in await browser.text("header")


async def test_an_operator_finds_the_failing_endpoint_pauses_and_resumes_it(
    browser: Browser, stack: Stack
) -> None:
    await sign_in(browser, stack)
    stack.receiver.policy = answer_hostile_500
    made = await stack.pay(4)

    async def breaker_open() -> bool:
        return (await select_endpoint(stack.conn, "notification")).breaker == "open"

    await wait_for(breaker_open, timeout=60, what="notification's breaker to open")
    await browser.open(stack.url("/"))
    rows = (await browser.text("#endpoints tbody")).splitlines()
    assert rows[0].startswith("notification") and "breaker open" in rows[0], rows  # first
    assert rows[1].startswith("analytics") and "breaker closed" in rows[1], rows
    await browser.screenshot("overview")

    await browser.click("#endpoint-notification a")
    assert "breaker open" in await browser.text("#breaker")
    dead = await browser.text("#dead-deliveries")
    assert f"500 HTTP 500: {HOSTILE}" in dead, "the receiver's answer, as text"
    assert await browser.run_script("return window.pwned === undefined")
    await browser.screenshot("endpoint")

    # A payment's story, found by its reference: metadata and answers shown as text.
    await browser.click("nav a[href$='/payments']")
    await browser.fill("#q", made[0]["reference"])
    await browser.click("form.filters button")
    assert (await browser.url()).endswith(f"{CONSOLE}/payments/{made[0]['payment_id']}")
    assert json.dumps(METADATA) in await browser.text("#metadata")
    story = await browser.text("main")
    assert "payment.succeeded" in story and f"HTTP 500: {HOSTILE}" in story
    assert await browser.run_script("return window.pwned === undefined")
    await browser.screenshot("payment")
    await browser.open(stack.url("/endpoints/notification"))
    await browser.click("#action-pause")
    assert "Pause endpoint notification?" in await browser.text("h1")
    await browser.fill("#reason", REASON)
    await browser.screenshot("confirm-pause")
    await browser.click("#confirm")
    assert "PAUSED" in await browser.text("#state")
    assert REASON in await browser.text("#state"), "the reason shows as text"
    assert await browser.run_script("return window.pwned === undefined")

    stack.receiver.policy = answer_ok
    await browser.click("#action-resume")
    await browser.click("#confirm")
    assert "ACTIVE" in await browser.text("#state")
    assert "breaker closed" in await browser.text("#breaker")

    await browser.open(stack.url("/endpoints"))
    await browser.screenshot("endpoints")

    # Replay the dead deliveries, after the preview says how many go where.
    everything = {payment["payment_id"] for payment in made}
    await browser.open(stack.url("/replay"))
    await browser.screenshot("replay")
    await browser.click("#dead-form button")
    preview = await browser.text("#preview")
    assert "dead deliver" in preview and "would go back in line" in preview, preview
    assert "notification" in await browser.text("#preview-table")
    await browser.screenshot("replay-preview")
    await browser.click("#confirm")
    assert "back in line" in await browser.text("#replayed")

    def all_received() -> bool:
        return {d.event["payment_id"] for d in stack.receiver.accepted()} == everything

    await wait_for(all_received, timeout=60, what="every payment's event, the dead ones replayed")

    await browser.open(stack.url("/audit"))
    log = await browser.text("#audit tbody")
    lines = log.splitlines()
    assert lines[0].split()[3:5] == ["console:ops", "127.0.0.1"], log
    for action in ("deliveries.replay", "endpoint.resume", "endpoint.pause"):
        assert action in log, log
    assert REASON in log
    assert await browser.run_script("return window.pwned === undefined")
    await browser.screenshot("audit")


async def test_without_a_session_or_its_csrf_token_nothing_is_done(
    browser: Browser, stack: Stack
) -> None:
    await sign_in(browser, stack)
    await browser.open(stack.url("/endpoints/notification/pause"))
    # The same form, sent without its CSRF token (built by the driver: the page has no script).
    await browser.run_script(
        "document.querySelectorAll('main input[name=csrf]').forEach(i => i.remove())"
    )
    await browser.click("#confirm")
    assert "Refused" in await browser.text("h1")
    assert "stale or not the console's" in await browser.text("main")

    # Signed out, the pages lead to the sign-in page and the form is refused.
    await browser.open(stack.url("/endpoints/notification/pause"))
    await browser.click("header form button")  # sign out
    assert (await browser.url()).endswith(CONSOLE + "/sign-in")
    assert await browser.cookies() == []
    await browser.open(stack.url("/endpoints/notification"))
    assert (await browser.url()).endswith(CONSOLE + "/sign-in")
    assert (await select_endpoint(stack.conn, "notification")).state == "ACTIVE"
    done = "SELECT count(*) FROM audit_log WHERE actor LIKE 'console:%'"
    assert await stack.conn.fetchval(done) == 0


# -- the gateway ----------------------------------------------------------------------------------
CONFIRM = matching("POST", r"/v1/payment_intents/\w+/confirm")
DECISION = "the gateway says the intent succeeded"


@dataclass
class GatewayStack:
    api: ApiProcess
    relay: RelayProcess
    to_gateway: FaultProxy  # between the API and the gateway
    conn: asyncpg.Connection

    def url(self, path: str) -> str:
        return self.api.base_url + CONSOLE + path

    async def pay(self, expected: int) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.api.base_url, timeout=30) as client:
            response = await client.post("/payments", json=payment_body(amount="31.50"))
        assert response.status_code == expected, response.text
        made: dict[str, Any] = response.json()
        return made


@pytest.fixture
async def gateway_stack(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, relays: RelayLauncher,
    embedded_gateway: EmbeddedGateway, proxy_factory: Any,
) -> AsyncIterator[GatewayStack]:  # fmt: skip
    """`serve` charging at the embedded gateway through a fault proxy, and a relay whose gateway
    worker finds the gateway down (its own proxy answers 503 to everything) and flags what it
    cannot learn for review after 2 checks."""
    to_gateway: FaultProxy = await proxy_factory(embedded_gateway.base_url)
    down: FaultProxy = await proxy_factory(embedded_gateway.base_url)
    down.on(matching(path=r"/v1/.*"), answer(503), times=None)
    env = minimal_environment(
        database_url=database_url,
        environment="test",
        log_level="WARNING",
        admin_api_keys=f"ops:{TOKEN}",
        **gateway_settings(to_gateway.base_url, gateway_timeout_seconds=1),
    )
    api = ApiProcess("api", env, tmp_path, workers=1)
    api.start()
    try:
        await api.wait_ready()
        relay = relays.start(**gateway_settings(down.base_url, gateway_max_checks=2))
        yield GatewayStack(api, relay, to_gateway, conn)
    finally:
        await api.terminate()


async def test_an_operator_follows_a_charge_at_the_gateway_and_decides_one_flagged_for_review(
    browser: Browser, gateway_stack: GatewayStack
) -> None:
    stack = gateway_stack
    await sign_in(browser, stack)
    charged = await stack.pay(200)
    intent = charged["gateway_reference"]
    assert intent.startswith("pi_"), charged

    # A payment's story, found by its intent at the gateway.
    await browser.click("nav a[href$='/payments']")
    await browser.fill("#q", intent)
    await browser.click("form.filters button")
    assert (await browser.url()).endswith(f"{CONSOLE}/payments/{charged['payment_id']}")
    operations = await browser.text("#gateway-operations tbody")
    assert intent in operations and "DONE" in operations and "charge" in operations
    await browser.screenshot("payment-gateway")

    # A charge whose answer is lost, then the gateway down for the worker: flagged for review.
    stack.to_gateway.on(CONFIRM, DROP_AFTER_FORWARD)
    pending = await stack.pay(202)

    async def flagged() -> bool:
        phase = await stack.conn.fetchval(
            "SELECT phase FROM gateway_operations WHERE payment_id = $1", pending["payment_id"]
        )
        return bool(phase == "REVIEW")

    try:
        await wait_for(flagged, timeout=60, what="the charge to be flagged for review")
    except AssertionError:
        raise AssertionError(dump_logs([stack.relay])) from None

    await browser.open(stack.url("/"))
    assert "flagged for review" in await browser.text("#gateway-attention")
    first = await browser.run_script("return document.querySelector('main table').id")
    assert first == "gateway", "the review queue comes before the endpoints"
    assert "never run" in await browser.text("#gateway-reconciliation")
    await browser.screenshot("overview-gateway")

    await browser.click("#gateway-review a")
    row = await browser.text("#review tbody")
    assert str(pending["payment_id"]) in row and "31.50" in row
    assert "intent SUCCEEDED" in row, "the gateway's view, asked now (the API reaches it)"
    await browser.screenshot("review")
    await browser.click(f"#succeed-{pending['payment_id']}")
    assert "succeeded?" in await browser.text("h1")
    assert "intent SUCCEEDED" in await browser.text("#gateway-says")
    await browser.fill("#reason", DECISION)
    await browser.screenshot("decide")
    await browser.click("#confirm")
    assert f"Payment {pending['payment_id']} is decided" in await browser.text("#decided")
    assert "Nothing is flagged for review." in await browser.text("#review tbody")
    status = await stack.conn.fetchval(
        "SELECT status FROM payments WHERE payment_id = $1", pending["payment_id"]
    )
    assert status == "SUCCESS"

    await browser.click("#decided a")  # the audit log, filtered to the payment
    log = await browser.text("#audit tbody")
    assert "payment.settle" in log and "console:ops" in log and DECISION in log, log
    assert "PENDING" in log and "SUCCESS" in log, "the status before and after"
    assert await browser.run_script("return window.pwned === undefined")
