"""A mixed workload through the real API process, delivered by a real relay process.

Payments (charged at once, and asynchronous ones settled SUCCESS or FAILED), partial and full
refunds, all sent concurrently; every event the API wrote reaches the receiver, signed (verified
with the `standardwebhooks` package), `webhook-id` = `event_id`, body = the stored payload, in
order per payment.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest

from payment_service.embedded import free_port
from tests.support.api import ADMIN_AUTH, ADMIN_KEYS
from tests.support.commands import service_command
from tests.support.database import EventRow
from tests.support.environment import minimal_environment
from tests.support.processes import RelayLauncher
from tests.support.receiver import Receiver, assert_ordered_per_payment
from tests.support.waiting import wait_until

_keys = itertools.count(1)


def key(kind: str) -> str:
    return f"relay-workload-{kind}-{next(_keys)}"


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[str]:
    """`payment-service serve` on 127.0.0.1; its base URL."""
    port = free_port()
    env = minimal_environment(
        database_url=database_url,
        async_methods="UPI",
        admin_api_keys=",".join(ADMIN_KEYS),  # asynchronous payments are settled by an operator
        environment="test",
        log_level="WARNING",
    )
    with (tmp_path / "api.log").open("wb") as log:
        process = subprocess.Popen(
            service_command("serve", "--host", "127.0.0.1", "--port", str(port)),
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=20)


async def api_up(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/health")).status_code == 200
    except httpx.TransportError:
        return False


async def ok(response: httpx.Response) -> dict[str, object]:
    assert response.status_code in (200, 202), response.text
    return response.json()


async def card_flow(http: httpx.AsyncClient, trip: int, refunds: list[str | None]) -> None:
    """A charged payment, then refunds (an amount, or None for 'the rest')."""
    payment = await ok(
        await http.post(
            "/payments",
            json={
                "idempotency_key": key("pay"),
                "trip_id": trip,
                "method": "CARD",
                "amount": "100.00",
            },
        )
    )
    for amount in refunds:
        body: dict[str, object] = {"idempotency_key": key("refund")}
        if amount is not None:
            body["amount"] = amount
        await ok(await http.post(f"/payments/{payment['payment_id']}/refunds", json=body))


async def async_flow(http: httpx.AsyncClient, trip: int, outcome: str, refund: bool) -> None:
    """An asynchronous payment (202, PENDING), settled by an operator, maybe refunded."""
    response = await http.post(
        "/payments",
        json={
            "idempotency_key": key("pay"),
            "trip_id": trip,
            "method": "UPI",
            "amount": "49.99",
        },
    )
    assert response.status_code == 202, response.text
    payment_id = response.json()["payment_id"]
    await ok(
        await http.post(
            f"/admin/payments/{payment_id}/settlement",
            json={
                "idempotency_key": key("settle"),
                "status": outcome,
                "gateway_reference": f"gw-{trip}",
            },
            headers=ADMIN_AUTH,
        )
    )
    if refund:
        await ok(
            await http.post(
                f"/payments/{payment_id}/refunds",
                json={
                    "idempotency_key": key("refund"),
                    "amount": "9.99",
                },
            )
        )


async def test_a_mixed_workload_through_the_api_is_delivered_signed_and_in_order(
    api: str, conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    relays.start(relay_concurrency=8)
    async with httpx.AsyncClient(base_url=api, trust_env=False, timeout=30) as http:
        await wait_until(lambda: api_up(http), timeout=60, interval=0.1)
        flows = []
        refund_count = 0
        trips = itertools.count(5001)
        for i in range(12):
            refunds: list[list[str | None]] = [
                [],
                ["10.00"],
                ["10.00", "20.00"],
                [None],
                ["30.00", None],
            ]
            flows.append(card_flow(http, next(trips), refunds[i % len(refunds)]))
            refund_count += len(refunds[i % len(refunds)])
        for i in range(8):
            flows.append(
                async_flow(http, next(trips), "SUCCESS" if i % 2 else "FAILED", refund=i % 4 == 1)
            )
        await asyncio.gather(*flows)

    rows = await conn.fetch(
        "SELECT id, event_id::text, aggregate_id, event_type, payload"
        " FROM outbox_events ORDER BY id"
    )
    types = [r["event_type"] for r in rows]
    assert types.count("payment.pending") == 8
    assert types.count("payment.failed") == 4
    assert types.count("payment.succeeded") == 12 + 4
    assert types.count("payment.refunded") == refund_count + 2
    expected = {r["event_id"] for r in rows}
    await wait_until(lambda: expected <= receiver.accepted_ids(), timeout=60)

    stored = {r["event_id"]: r for r in rows}
    # Each payment's events in the order they were written: its state changes 1, 2, 3, …
    seq: dict[int, int] = {}
    events = []
    for r in rows:
        seq[r["aggregate_id"]] = seq.get(r["aggregate_id"], 0) + 1
        events.append(EventRow(r["id"], r["event_id"], r["aggregate_id"], seq[r["aggregate_id"]]))
    written_as = {e.event_id: e.seq for e in events}
    for delivery in receiver.deliveries:
        payload = delivery.verify()
        row = stored[delivery.webhook_id]
        assert payload["event_id"] == delivery.webhook_id == delivery.headers["idempotency-key"]
        assert delivery.body == row["payload"].encode()
        assert payload["event_type"] == row["event_type"]
        assert payload["payment_id"] == row["aggregate_id"]
        exact = json.loads(delivery.body, parse_float=Decimal)
        assert {
            "event_id",
            "event_type",
            "occurred_at",
            "payment_id",
            "trip_id",
            "amount",
            "currency",
            "status",
            "reference",
            "sequence",
        } <= set(exact)
        assert exact["sequence"] == written_as[delivery.webhook_id], exact
        if row["event_type"] == "payment.refunded":
            assert exact["refund_id"] and exact["refund_amount"] in (
                Decimal("10.00"),
                Decimal("20.00"),
                Decimal("30.00"),
                Decimal("9.99"),
                Decimal("100.00"),
                Decimal("70.00"),
            )
    assert set(receiver.accepted_counts().values()) == {1}

    # Order per payment: the receiver saw each payment's events in the order they were written.
    assert_ordered_per_payment(receiver, events)


async def test_a_committed_payment_wakes_an_idle_relay_without_waiting_for_its_poll(
    api: str, receiver: Receiver, relays: RelayLauncher
) -> None:
    # The relay polls only every 10 minutes here: a callback within seconds can only come from
    # the API's after-commit NOTIFY reaching its LISTEN.
    relay = relays.start(relay_poll_interval=600)
    await wait_until(lambda: relay.logged("listening for new events") >= 1, timeout=30)
    async with httpx.AsyncClient(base_url=api, trust_env=False, timeout=30) as http:
        await wait_until(lambda: api_up(http), timeout=60, interval=0.1)
        for trip in (7001, 7002, 7003):  # one NOTIFY may carry several commits: any wakes it
            payment = await ok(
                await http.post(
                    "/payments",
                    json={
                        "idempotency_key": key("wake"),
                        "trip_id": trip,
                        "method": "CARD",
                        "amount": "12.34",
                    },
                )
            )

            def delivered(payment_id: object = payment["payment_id"]) -> bool:
                return any(d.event.get("payment_id") == payment_id for d in receiver.accepted())

            await wait_until(delivered, timeout=10)
