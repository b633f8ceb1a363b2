"""The embedded gateway in the tests, and what it holds, counted by our ids.

- `embedded_gateway` (session): one real `localstripe` process on a free 127.0.0.1 port, started
  the way `payment-service run` starts it (payment_service/gateway/embedded.py); its log is in
  the session's temporary folder. Tests share it: each takes its own ids from `ids` rather than
  clearing it, so nothing a test counts was made by another.
- `read_ledger(...)`: everything the gateway holds (intents and refunds), read over its HTTP API
  with the tests' own client, never through the adapter under test; `GatewayLedger` counts it
  per payment id and refund id, from the metadata the service puts on each object.
- `gateway_settings(base_url)`: the settings of an API or a relay that charges at the embedded
  gateway (the tests run without a gateway unless they ask for one);
- `running_worker(database_url, base_url)`: the relay's gateway worker, in the test's event loop;
- `signed_event(...)`: a webhook body and headers signed as the gateway signs them;
- `make_payment_method(...)`: a payment method from a raw test card number or IBAN;
- `listening_addresses(port)`: where a TCP port is listened on, from /proc/net.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe

from outbox_relay.gateway_worker import GatewayWorker
from outbox_relay.metrics import RelayMetrics
from outbox_relay.state import RelayState
from payment_service.config import Settings, load_settings
from payment_service.gateway.embedded import EMBEDDED_API_KEY, EmbeddedGateway
from payment_service.gateway.factory import gateway_from_settings
from payment_service.gateway.interface import Gateway

# A webhook secret for the tests only, in Stripe's format.
WEBHOOK_SECRET = "whsec_tests-only-gateway-webhook-secret"
AUTH = {"Authorization": f"Bearer {EMBEDDED_API_KEY}"}
PAGE = 100

# Test cards and IBANs the embedded gateway knows (as Stripe's test mode does).
CARD_OK = "4242424242424242"
CARD_DECLINED = "4000000000000341"  # declined when charged
CARD_3DS = "4000002500003155"  # needs 3-D Secure: the intent requires action
IBAN_OK = "DE89370400440532013000"
IBAN_FAILING = "DE62370400440532013001"  # processing first, then failed

# Far above the payment and refund ids of the tests' databases (each starts at 1), whose charges
# through the API share the session's gateway too.
FIRST_ID = 1_000_000_000
_ids = itertools.count(FIRST_ID)


class Ids:
    """Fresh ids for this session: payments and refunds no other test uses (the API's tests tell
    their payments apart at the gateway by their references instead: `of_reference`)."""

    def payment(self) -> int:
        return next(_ids)

    def refund(self) -> int:
        return next(_ids)


@pytest.fixture(name="ids")
def ids_fixture() -> Ids:
    return Ids()


@pytest.fixture(name="embedded_gateway", scope="session")
def embedded_gateway_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedGateway]:
    """One embedded gateway (a real localstripe process on 127.0.0.1) for the session."""
    log_path = Path(tmp_path_factory.mktemp("gateway")) / "localstripe.log"
    gateway = EmbeddedGateway(log_path=log_path)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


async def make_payment_method(
    base_url: str, *, card: str | None = None, iban: str | None = None
) -> str:
    """A payment method at the gateway from a raw test card number or IBAN; its id."""
    if card is not None:
        form = {
            "type": "card",
            "card[number]": card,
            "card[exp_month]": "12",
            "card[exp_year]": "2034",
            "card[cvc]": "123",
        }
    else:
        assert iban is not None
        form = {"type": "sepa_debit", "sepa_debit[iban]": iban}
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=10) as client:
        answer = await client.post("/v1/payment_methods", data=form)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def gateway_settings(base_url: str, **overrides: Any) -> dict[str, Any]:
    """Settings overrides (lower-case names, as `running_api` takes them) that charge at the
    embedded gateway at `base_url`, with short timings; `overrides` win."""
    return {
        "gateway": "stripe",
        "stripe_secret_key": EMBEDDED_API_KEY,
        "stripe_api_base": base_url,
        "stripe_api_flavour": "localstripe",
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "gateway_timeout_seconds": 5,
        "gateway_check_interval": 0.2,
        "gateway_max_checks": 3,
        "relay_poll_interval": 0.1,
        **overrides,
    }


def _intent_of(refund: dict[str, Any]) -> str | None:
    intent = refund.get("payment_intent")
    return intent.get("id") if isinstance(intent, dict) else intent


@dataclass(frozen=True)
class GatewayLedger:
    """What the gateway held when it was read: every intent and refund, as its JSON."""

    intents: list[dict[str, Any]]
    refunds: list[dict[str, Any]]

    def intents_of(self, payment_id: int) -> list[dict[str, Any]]:
        return [i for i in self.intents if i["metadata"].get("payment_id") == str(payment_id)]

    def confirmed(self, payment_id: int) -> int:
        """Intents of this payment that were confirmed: a charge was attempted through them."""
        return sum(1 for i in self.intents_of(payment_id) if i.get("latest_charge"))

    def charged(self, payment_id: int) -> int:
        """Intents of this payment whose charge moved money or is moving it."""
        return sum(
            1
            for i in self.intents_of(payment_id)
            if i.get("latest_charge") and i["latest_charge"]["status"] in ("succeeded", "pending")
        )

    def refunds_of(self, payment_id: int) -> list[dict[str, Any]]:
        return [r for r in self.refunds if r["metadata"].get("payment_id") == str(payment_id)]

    def refunds_for(self, refund_id: int) -> int:
        """Gateway refunds made for our refund `refund_id`."""
        return sum(1 for r in self.refunds if r["metadata"].get("refund_id") == str(refund_id))

    def refunded_minor_units(self, payment_id: int) -> int:
        return sum(int(r["amount"]) for r in self.refunds_of(payment_id))

    def of_reference(self, reference: str) -> GatewayLedger:
        """What the gateway holds for our payment with this reference (PAY-…, unique across the
        tests' databases, whose payment ids all start at 1): its intents and their refunds."""
        intents = [i for i in self.intents if i["metadata"].get("reference") == reference]
        ids = {i["id"] for i in intents}
        return GatewayLedger(intents, [r for r in self.refunds if _intent_of(r) in ids])

    @property
    def confirmed_intents(self) -> int:
        """Intents confirmed (a charge was attempted through them)."""
        return sum(1 for i in self.intents if i.get("latest_charge"))

    @property
    def charged_intents(self) -> int:
        """Intents whose charge moved money or is moving it."""
        return sum(
            1
            for i in self.intents
            if i.get("latest_charge") and i["latest_charge"]["status"] in ("succeeded", "pending")
        )

    @property
    def refunded(self) -> int:
        """Minor units refunded."""
        return sum(int(r["amount"]) for r in self.refunds if r["status"] == "succeeded")


async def read_ledger(base_url: str) -> GatewayLedger:
    """Every intent and refund the gateway holds, read page by page."""
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=30) as client:
        return GatewayLedger(
            intents=await _list_all(client, "/v1/payment_intents"),
            refunds=await _list_all(client, "/v1/refunds"),
        )


async def _list_all(client: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": PAGE}
    while True:
        answer = await client.get(path, params=params)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        objects.extend(page["data"])
        if not page["has_more"] or not page["data"]:
            return objects
        params["starting_after"] = page["data"][-1]["id"]


async def event_types(base_url: str) -> list[str]:
    """The types of every event the gateway has made so far (sent or about to be), oldest first."""
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=30) as client:
        return [event["type"] for event in await _list_all(client, "/v1/events")]


def register_webhook(gateway: EmbeddedGateway, url: str) -> None:
    """Have the gateway POST its events to `url`, signed with `WEBHOOK_SECRET` (replacing the
    URL an earlier test registered: one webhook for the session)."""
    gateway.register_webhook(url, WEBHOOK_SECRET, webhook_id="tests")


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def listening_addresses(port: int) -> list[IpAddress]:
    """The local addresses of the sockets listening on TCP `port` (from /proc/net)."""
    found: list[IpAddress] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, _, port_hex = local.partition(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(
                bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8)
            )
            found.append(ipaddress.ip_address(raw))
    return found


def only_loopback(addresses: list[IpAddress]) -> bool:
    def loopback(address: IpAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped.is_loopback
        return address.is_loopback

    return bool(addresses) and all(loopback(a) for a in addresses)


def relay_settings(database_url: str | None, base_url: str, **overrides: Any) -> Settings:
    """A relay's settings that charge at the gateway at `base_url` (`gateway_settings`)."""
    return load_settings(
        _env_file=None,
        environment="test",
        database_url=database_url,
        **gateway_settings(base_url, **overrides),
    )


def gateway_adapter(base_url: str, **overrides: Any) -> Gateway:
    """The service's adapter for the gateway at `base_url`, as a relay makes it (close it in the
    event loop that used it)."""
    gateway = gateway_from_settings(relay_settings(None, base_url, **overrides))
    assert gateway is not None
    return gateway


@contextlib.asynccontextmanager
async def running_worker(
    database_url: str, base_url: str, **overrides: Any
) -> AsyncIterator[GatewayWorker]:
    """The relay's gateway worker (outbox_relay.gateway_worker) against this database and the
    gateway at `base_url`, run in the test's event loop until the block ends."""
    settings = relay_settings(database_url, base_url, **overrides)
    gateway = gateway_from_settings(settings)
    assert gateway is not None
    state = RelayState(settings, RelayMetrics())
    worker = GatewayWorker(state, gateway)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        state.stop.set()
        await asyncio.wait_for(task, 30)
        await worker.close()


async def intent_json(base_url: str, intent_id: str) -> dict[str, Any]:
    """The intent as the gateway holds it (the object its events carry)."""
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=10) as client:
        answer = await client.get(f"/v1/payment_intents/{intent_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def signed_event(
    event_id: str,
    event_type: str,
    obj: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    created: int | None = None,
    signed_at: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A webhook as the gateway sends it: an event around `obj`, signed with `secret`."""
    created = int(time.time()) if created is None else created
    event = {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created": created,
        "data": {"object": obj},
    }
    body = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(
        body, secret, timestamp=int(time.time()) if signed_at is None else signed_at
    )
    return body.encode(), {"Stripe-Signature": header, "Content-Type": "application/json"}
