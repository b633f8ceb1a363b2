"""The embedded gateway as `payment-service run` and the tests start it: a real localstripe
process, listening on loopback only, registering its webhook again after a restart, stopping
cleanly, and never outliving the process that started it."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from payment_service.gateway.embedded import (
    EMBEDDED_API_KEY,
    EmbeddedGateway,
    EmbeddedGatewayError,
    installed,
)
from payment_service.gateway.interface import ChargeRequest, GatewayNotFound, IntentStatus
from payment_service.gateway.stripe_adapter import StripeGateway
from tests.support.gateway import WEBHOOK_SECRET, listening_addresses, only_loopback
from tests.support.receiver import Receiver
from tests.support.waiting import port_closed, wait_for


def non_loopback_address() -> str | None:
    """One of this machine's own addresses that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


@pytest.fixture(name="own_gateway")
def own_gateway_fixture(tmp_path: Path) -> Iterator[EmbeddedGateway]:
    """An embedded gateway of this test's own (it is restarted or stopped)."""
    gateway = EmbeddedGateway(log_path=tmp_path / "localstripe.log")
    try:
        yield gateway
    finally:
        gateway.kill()


@pytest.fixture(name="webhooks")
async def webhooks_fixture() -> AsyncIterator[Receiver]:
    receiver = await Receiver(path="/hook").start()
    try:
        yield receiver
    finally:
        await receiver.close()


def test_the_embedded_gateway_is_installed_and_never_imported() -> None:
    assert installed()
    assert "localstripe" not in sys.modules


def test_it_listens_on_loopback_only(own_gateway: EmbeddedGateway) -> None:
    own_gateway.start()
    assert own_gateway.port is not None

    addresses = listening_addresses(own_gateway.port)

    assert only_loopback(addresses), addresses
    socket.create_connection(("127.0.0.1", own_gateway.port), timeout=5).close()
    other = non_loopback_address()
    if other is not None:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((other, own_gateway.port), timeout=5).close()


def test_without_the_launcher_it_would_listen_everywhere(tmp_path: Path) -> None:
    """What the launcher prevents: started as itself, the program binds every interface (so the
    check above can fail)."""

    class Unconfined(EmbeddedGateway):
        def command(self, port: int) -> list[str]:
            return [sys.executable, "-m", "localstripe", "--port", str(port), "--from-scratch"]

    gateway = Unconfined(log_path=tmp_path / "unconfined.log")
    try:
        gateway.start()
        assert gateway.port is not None
        assert not only_loopback(listening_addresses(gateway.port))
    finally:
        gateway.kill()


def test_a_taken_port_fails_clearly(own_gateway: EmbeddedGateway) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = EmbeddedGateway(port=port)
        with pytest.raises(EmbeddedGatewayError, match="exited"):
            gateway.start(timeout=20)
        assert not gateway.running()


async def test_stop_is_clean_and_frees_the_port(own_gateway: EmbeddedGateway) -> None:
    own_gateway.start()
    port = own_gateway.port
    assert port is not None

    code = own_gateway.stop()

    assert code == 0
    assert await port_closed(port)
    assert own_gateway.exited() == 0


async def test_a_restart_starts_from_scratch_and_registers_the_webhook_again(
    own_gateway: EmbeddedGateway, webhooks: Receiver
) -> None:
    own_gateway.register_webhook(webhooks.base_url + "/hook", WEBHOOK_SECRET)
    own_gateway.start()
    port = own_gateway.port
    gateway = StripeGateway(
        api_key=EMBEDDED_API_KEY,
        api_base=own_gateway.base_url,
        webhook_secret=WEBHOOK_SECRET,
        timeout_seconds=5,
        api_flavour="localstripe",
    )
    try:
        before = await gateway.create_intent(
            ChargeRequest(1, 1, "PAY-1", Decimal("1.00"), "INR", "CARD", "pm_card_visa")
        )

        own_gateway.restart()

        assert own_gateway.port == port, "the same address: the service's settings still hold"
        with pytest.raises(GatewayNotFound):
            await gateway.retrieve(before.id)  # its state is gone
        after = await gateway.create_intent(
            ChargeRequest(2, 2, "PAY-2", Decimal("1.00"), "INR", "CARD", "pm_card_visa")
        )
        confirmed = await gateway.confirm(after.id, payment_id=2, saved_method=False)
        assert confirmed.status == IntentStatus.SUCCEEDED
        delivery = (
            await wait_for(
                lambda: [d for d in webhooks.deliveries if after.id.encode() in d.body],
                timeout=10,
                what="a webhook from the restarted gateway",
            )
        )[0]
        assert gateway.parse_webhook(delivery.body, delivery.headers).intent is not None
    finally:
        await gateway.close()


async def test_clear_forgets_every_object(own_gateway: EmbeddedGateway) -> None:
    own_gateway.start()
    headers = {"Authorization": f"Bearer {EMBEDDED_API_KEY}"}
    async with httpx.AsyncClient(base_url=own_gateway.base_url, headers=headers) as client:
        created = await client.post(
            "/v1/payment_intents",
            data={"amount": "100", "currency": "inr", "payment_method": "pm_card_visa"},
        )
        assert created.status_code == 200
        own_gateway.clear()
        assert (await client.get(f"/v1/payment_intents/{created.json()['id']}")).status_code == 404


async def test_it_does_not_outlive_the_process_that_started_it(tmp_path: Path) -> None:
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from payment_service.gateway.embedded import EmbeddedGateway\n"
            "g = EmbeddedGateway(); g.start()\n"
            "print(g.process.pid, flush=True)\n"
            "sys.stdin.read()\n",  # holds until its stdin closes or it is killed
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        assert starter.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(starter.stdout.readline), 60)
        child = int(line)

        os.kill(starter.pid, signal.SIGKILL)
        starter.wait(10)

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            return Path(f"/proc/{child}/status").read_text().count("zombie") > 0

        await wait_for(gone, timeout=20, what="the embedded gateway to stop with its parent")
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(10)
