"""Fan-out in the write (issue 11): the API's statement that writes an outbox event
writes, in the same statement, one delivery per ACTIVE or PAUSED endpoint whose event types match;
a DISABLED endpoint gets none; an endpoint added later gets events from then on. Through the real
app over HTTP, against a real PostgreSQL."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import httpx

from payment_service import endpoints
from tests.integration.conftest import ApiFactory
from tests.support.api import (
    ADMIN_KEYS,
    PAYMENT_FIELDS,
    assert_replay,
    create_payment,
    exact_json,
    new_key,
    payment_body,
    post_json,
    settle,
)
from tests.support.audit import OPERATOR

ALL_TYPES = ("notification", "trip", "driver")


async def subscribe(db: asyncpg.Connection) -> None:
    """notification (`*`, left by migration 0006), trip and driver, as the issue describes them."""
    await endpoints.insert_endpoint(
        db,
        name="trip",
        url="http://127.0.0.1:9/trip",
        event_types=("payment.succeeded", "payment.refunded"),
        operator=OPERATOR,
    )
    await endpoints.insert_endpoint(
        db,
        name="driver",
        url="http://127.0.0.1:9/driver",
        event_types=("payment.*",),
        operator=OPERATOR,
    )


async def deliveries_of(db: asyncpg.Connection, payment_id: int) -> list[tuple[str, str]]:
    """(event type, endpoint name) of every delivery of a payment's events, in event order."""
    rows = await db.fetch(
        """
        SELECT e.event_type, n.name
          FROM deliveries AS d
          JOIN outbox_events AS e ON e.id = d.event_id
          JOIN endpoints AS n ON n.endpoint_id = d.endpoint_id
         WHERE d.aggregate_id = $1
         ORDER BY e.id, n.name
        """,
        payment_id,
    )
    return [(row["event_type"], row["name"]) for row in rows]


def expected(event_type: str, *names: str) -> list[tuple[str, str]]:
    return [(event_type, name) for name in sorted(names)]


async def refund(client: httpx.AsyncClient, payment_id: int, amount: str) -> httpx.Response:
    body = {"idempotency_key": new_key("refund"), "amount": Decimal(amount)}
    response = await post_json(client, f"/payments/{payment_id}/refunds", body)
    assert response.status_code == 200, response.text
    return response


async def settled(client: httpx.AsyncClient, payment_id: int, status: str) -> httpx.Response:
    response = await settle(client, payment_id, status)
    assert response.status_code == 200, response.text
    return response


async def test_each_write_fans_out_to_the_endpoints_whose_types_match(
    api_factory: ApiFactory, db: asyncpg.Connection
) -> None:
    client = (await api_factory(admin_api_keys=ADMIN_KEYS)).client
    await subscribe(db)

    charged = await create_payment(client, method="CARD", amount=Decimal("100.00"))
    await refund(client, charged["payment_id"], "40.00")
    pending = await create_payment(client, method="UPI")
    await settled(client, pending["payment_id"], "SUCCESS")
    failed = await create_payment(client, method="UPI")
    await settled(client, failed["payment_id"], "FAILED")

    assert await deliveries_of(db, charged["payment_id"]) == [
        *expected("payment.succeeded", *ALL_TYPES),
        *expected("payment.refunded", *ALL_TYPES),
    ]
    assert await deliveries_of(db, pending["payment_id"]) == [
        *expected("payment.pending", "notification", "driver"),
        *expected("payment.succeeded", *ALL_TYPES),
    ]
    assert await deliveries_of(db, failed["payment_id"]) == [
        *expected("payment.pending", "notification", "driver"),
        *expected("payment.failed", "notification", "driver"),
    ]
    # Every delivery starts as the relay expects it: pending, untried, unclaimed, of its payment.
    rows = await db.fetch(
        """
        SELECT d.status, d.attempts, d.counted_attempts, d.claim_token, d.locked_until,
               d.aggregate_id = e.aggregate_id AS same_payment
          FROM deliveries AS d JOIN outbox_events AS e ON e.id = d.event_id
        """
    )
    assert len(rows) == 6 + 5 + 4
    assert {tuple(row) for row in rows} == {("PENDING", 0, 0, None, None, True)}


async def test_paused_endpoints_get_deliveries_and_disabled_ones_do_not(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await subscribe(db)
    await endpoints.set_state(db, "trip", "PAUSED", operator=OPERATOR)
    await endpoints.set_state(db, "driver", "DISABLED", reason="test", operator=OPERATOR)

    charged = await create_payment(client, method="CARD")

    assert await deliveries_of(db, charged["payment_id"]) == expected(
        "payment.succeeded", "notification", "trip"
    )

    # Enabled again: the next event reaches it (the one it missed is for `outbox replay`).
    await endpoints.set_state(db, "driver", "ACTIVE", operator=OPERATOR)
    await refund(client, charged["payment_id"], "10.00")
    assert await deliveries_of(db, charged["payment_id"]) == [
        *expected("payment.succeeded", "notification", "trip"),
        *expected("payment.refunded", *ALL_TYPES),
    ]


async def test_an_endpoint_added_later_gets_events_from_then_on(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    first = await create_payment(client, method="CARD")
    assert await deliveries_of(db, first["payment_id"]) == expected(
        "payment.succeeded", "notification"
    )

    # Added while the API runs: the very next statement sees it (nothing cached).
    await subscribe(db)
    await refund(client, first["payment_id"], "5.00")
    second = await create_payment(client, method="CARD")

    assert await deliveries_of(db, first["payment_id"]) == [
        *expected("payment.succeeded", "notification"),
        *expected("payment.refunded", *ALL_TYPES),
    ]
    assert await deliveries_of(db, second["payment_id"]) == expected(
        "payment.succeeded", *ALL_TYPES
    )


async def test_an_endpoint_subscribed_to_nothing_written_gets_nothing(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await endpoints.insert_endpoint(
        db,
        name="rider",
        url="http://127.0.0.1:9/rider",
        event_types=("payment.failed",),
        operator=OPERATOR,
    )
    charged = await create_payment(client, method="CARD")
    assert await deliveries_of(db, charged["payment_id"]) == expected(
        "payment.succeeded", "notification"
    )


async def test_answers_and_replays_are_unchanged_and_write_no_more_deliveries(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await subscribe(db)
    body = payment_body(method="CARD", amount=Decimal("80.00"))
    first = await post_json(client, "/payments", body)
    assert first.status_code == 200, first.text
    payment = exact_json(first)
    assert set(payment) >= PAYMENT_FIELDS
    assert (payment["status"], payment["amount"]) == ("SUCCESS", Decimal("80.00"))
    refund_body = {"idempotency_key": new_key("refund"), "amount": Decimal("30.00")}
    path = f"/payments/{payment['payment_id']}/refunds"
    refunded = await post_json(client, path, refund_body)
    assert refunded.status_code == 200, refunded.text
    assert exact_json(refunded)["remaining_amount"] == Decimal("50.00")

    assert_replay(first, await post_json(client, "/payments", body))
    assert_replay(refunded, await post_json(client, path, refund_body))

    assert await deliveries_of(db, payment["payment_id"]) == [
        *expected("payment.succeeded", *ALL_TYPES),
        *expected("payment.refunded", *ALL_TYPES),
    ]
