"""`sequence` in every event: the payment's state-change count, 1 for the charge and one
more for each settlement or refund, distinct and gap-free even when refunds race."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import httpx

from tests.integration.conftest import ApiFactory
from tests.support.api import ADMIN_KEYS, create_payment, new_key, post_json, settle
from tests.support.database import outbox_rows


async def refund(client: httpx.AsyncClient, payment_id: int, amount: str) -> httpx.Response:
    return await post_json(
        client,
        f"/payments/{payment_id}/refunds",
        {"idempotency_key": new_key("refund"), "amount": Decimal(amount)},
    )


async def sequences(db: asyncpg.Connection, payment_id: int) -> list[tuple[str, int]]:
    return [(e["event_type"], e["payload"]["sequence"]) for e in await outbox_rows(db, payment_id)]


async def test_a_charge_and_two_refunds_are_events_1_2_3(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = await create_payment(client, amount=Decimal("90.00"))
    pid = payment["payment_id"]
    assert (await refund(client, pid, "30.00")).status_code == 200
    assert (await refund(client, pid, "60.00")).status_code == 200

    assert await sequences(db, pid) == [
        ("payment.succeeded", 1),
        ("payment.refunded", 2),
        ("payment.refunded", 3),
    ]


async def test_a_settlement_is_the_second_state_change(
    api_factory: ApiFactory, db: asyncpg.Connection
) -> None:
    client = (await api_factory(admin_api_keys=ADMIN_KEYS)).client
    succeeded = await create_payment(client, method="UPI", amount=Decimal("40.00"))
    failed = await create_payment(client, method="UPI", amount=Decimal("40.00"))
    for payment, status in ((succeeded, "SUCCESS"), (failed, "FAILED")):
        settled = await settle(client, payment["payment_id"], status)
        assert settled.status_code == 200, settled.text
    assert (await refund(client, succeeded["payment_id"], "40.00")).status_code == 200

    assert await sequences(db, succeeded["payment_id"]) == [
        ("payment.pending", 1),
        ("payment.succeeded", 2),
        ("payment.refunded", 3),
    ]
    assert await sequences(db, failed["payment_id"]) == [
        ("payment.pending", 1),
        ("payment.failed", 2),
    ]


async def test_concurrent_refunds_get_distinct_gap_free_sequences(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    payment = await create_payment(client, amount=Decimal("100.00"))
    pid = payment["payment_id"]

    answers = await asyncio.gather(*(refund(client, pid, "10.00") for _ in range(8)))

    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    events = await outbox_rows(db, pid)
    # In the order the events were written (commit order under the payment's row lock).
    assert [e["payload"]["sequence"] for e in events] == list(range(1, 10))
    # Each refund's event carries the total that refund left behind: sequence n ↔ n-1 refunds.
    for event in events[1:]:
        refunds_so_far = event["payload"]["sequence"] - 1
        assert event["payload"]["status"] == "PARTIALLY_REFUNDED"
        refunded = await db.fetchval(
            "SELECT sum(amount) FROM payment_refunds WHERE payment_id = $1 AND refund_id <= $2",
            pid,
            event["payload"]["refund_id"],
        )
        assert refunded == Decimal("10.00") * refunds_so_far
