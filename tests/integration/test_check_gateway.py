"""`payment-service check` on a database whose payments went through the gateway: what the API
writes through the embedded gateway passes (a charge, a decline, refunds, and a charge staged by
an API that died right after staging it), and each corruption of the gateway's bookkeeping fails
exactly the checks that own it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from app.idempotency import Guard, IdempotencyKey
from app.payments import stage_payment
from payment_service.database import connect
from payment_service.gateway.embedded import EmbeddedGateway
from tests.integration.test_check import cloned_database, failures, run
from tests.support.api import new_key, new_trip, payment_body, post_json, running_api
from tests.support.gateway import CARD_DECLINED, gateway_settings, make_payment_method


@pytest.fixture(scope="module")
async def written_through_the_gateway(
    postgres_server: Any, template_database: str, embedded_gateway: EmbeddedGateway
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    async with cloned_database(postgres_server, template_database, "check_gw_source") as name:
        yield name, await fill_through_the_gateway(postgres_server.dsn(name), embedded_gateway)


async def fill_through_the_gateway(dsn: str, gateway: EmbeddedGateway) -> dict[str, Any]:
    """Through the API at `gateway`: a charge, a decline, a charge partly refunded, and a charge
    staged by an API that died right after (PENDING); their ids by those names (and `refund`)."""
    ids: dict[str, Any] = {}
    async with running_api(dsn, **gateway_settings(gateway.base_url)) as api:

        async def pay(**fields: Any) -> dict[str, Any]:
            response = await post_json(api.client, "/payments", payment_body(**fields))
            assert response.status_code == 200, response.text
            return dict(response.json())

        ids["charged"] = (await pay())["payment_id"]
        declined = await pay(
            payment_method=await make_payment_method(gateway.base_url, card=CARD_DECLINED)
        )
        assert declined["status"] == "FAILED"
        ids["declined"] = declined["payment_id"]
        ids["refunded"] = (await pay(amount=Decimal("90.00")))["payment_id"]
        refund = await post_json(
            api.client,
            f"/payments/{ids['refunded']}/refunds",
            {"idempotency_key": new_key("refund"), "amount": "30.00"},
        )
        assert refund.status_code == 200 and refund.json()["status"] == "REFUNDED", refund.text
        ids["refund"] = refund.json()["refund_id"]
    # An API that died right after staging a charge (phase 1 committed, nothing after it).
    conn = await connect(dsn)  # with the service's codecs
    try:
        guard = Guard(
            key=IdempotencyKey.from_key(new_key("staged")),
            path="POST:/payments",
            fingerprint="0" * 64,
            ttl_seconds=86400,
        )
        staged = await stage_payment(
            conn,
            guard=guard,
            trip_id=new_trip(),
            amount=Decimal("10.00"),
            currency="INR",
            method="CARD",
            metadata={},
            payment_method="pm_card_visa",
            customer=None,
            saved_method=False,
            lease_seconds=30,
            claim_token=uuid.uuid4(),
        )
        ids["staged"] = staged.payment_id
    finally:
        await conn.close()
    return ids


@pytest.fixture
async def check_db(
    postgres_server: Any, written_through_the_gateway: tuple[str, dict[str, Any]]
) -> AsyncIterator[asyncpg.Connection]:
    async with cloned_database(
        postgres_server, written_through_the_gateway[0], "check_gw_copy"
    ) as name:
        conn = await asyncpg.connect(postgres_server.dsn(name))
        try:
            yield conn
        finally:
            await conn.close()


@pytest.fixture
def ids(written_through_the_gateway: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return written_through_the_gateway[1]


async def test_what_the_api_writes_through_the_gateway_is_consistent(
    check_db: asyncpg.Connection, ids: dict[str, Any]
) -> None:
    report = await run(check_db)
    assert report.consistent, failures(report)
    assert report.summary["gateway_open"] == 1  # the staged charge
    assert report.summary["gateway_review"] == 0


CHARGE = "FROM gateway_operations WHERE kind = 'CHARGE' AND payment_id = $1"
CORRUPTIONS: list[tuple[str, str, str, set[str]]] = [
    (
        "a decided payment whose charge is still open",
        f"UPDATE gateway_operations SET phase = 'PENDING' WHERE operation_id = (SELECT "
        f"operation_id {CHARGE})",
        "charged",
        {"gateway_charges"},
    ),
    (
        "a charged payment without its recorded intent",
        f"UPDATE gateway_operations SET intent_id = NULL WHERE operation_id = (SELECT "
        f"operation_id {CHARGE})",
        "charged",
        {"gateway_charges"},
    ),
    (
        "a staged charge closed although nothing decided it",
        f"UPDATE gateway_operations SET phase = 'DONE' WHERE operation_id = (SELECT "
        f"operation_id {CHARGE})",
        "staged",
        {"gateway_charges", "keys_in_progress", "payment_events", "payment_idempotency"},
    ),
    (
        "a decided charge's key left without its answer",
        """
        UPDATE idempotency_keys SET response_status = NULL, response_data = NULL
         WHERE key_hash = (SELECT idempotency_hash FROM payments WHERE payment_id = $1)
        """,
        "declined",
        {"keys_in_progress", "payment_idempotency"},
    ),
    (
        "an amount reserved by no refund",
        "UPDATE payments SET reserved_amount = 5 WHERE payment_id = $1",
        "charged",
        {"refund_reservations"},
    ),
    (
        "a refund's operation reopened after it was refunded",
        "UPDATE gateway_operations SET phase = 'PENDING' WHERE kind = 'REFUND' AND payment_id = $1",
        "refunded",
        {"gateway_refunds"},
    ),
    (
        "a refund made at the gateway without the gateway's id",
        "UPDATE payment_refunds SET gateway_refund_id = NULL WHERE payment_id = $1",
        "refunded",
        {"gateway_refunds"},
    ),
]


@pytest.mark.parametrize(
    ("sql", "target", "expected"),
    [pytest.param(sql, target, expected, id=case) for case, sql, target, expected in CORRUPTIONS],
)
async def test_each_corruption_fails_exactly_its_checks(
    check_db: asyncpg.Connection, ids: dict[str, Any], sql: str, target: str, expected: set[str]
) -> None:
    await check_db.execute(sql, ids[target])
    found = failures(await run(check_db))
    assert set(found) == expected, found
