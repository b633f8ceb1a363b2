"""Migration 0006 (subscriptions) on a database in use: every outbox event of the single-URL schema,
in whatever state the relay left it, becomes exactly one delivery to the endpoint `notification`
carrying that state (attempts, schedule, lease, last answer, attempt log). Nothing is lost, nothing
delivered becomes undelivered (it would be sent twice), and the API of the new version fans its
next event out on top of the upgraded rows."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from payment_service.migrations import migrate
from tests.migrations.conftest import migrated_before
from tests.support.api import exact_json, post_json, running_api

SUBSCRIPTIONS_VERSION = 6

# The delivery state that moved from outbox_events to deliveries, column for column.
STATE_COLUMNS = (
    "status",
    "attempts",
    "next_attempt_at",
    "locked_until",
    "claim_token",
    "last_error",
    "last_status_code",
    "last_attempt_at",
    "attempt_log",
    "created_at",
    "delivered_at",
)

# One event in each state the relay of version 5 leaves events in: (name, SET clause).
STATES = {
    "never tried": "",
    "retrying": """
        attempts = 3, next_attempt_at = now() + interval '2 minutes',
        last_error = 'HTTP 503', last_status_code = 503,
        last_attempt_at = now() - interval '5 seconds',
        attempt_log = '[{"attempt": 1, "outcome": "PENDING", "status_code": 503, "error": "HTTP 503", "tries": 3, "duration_ms": 12},
                        {"attempt": 2, "outcome": "PENDING", "status_code": null, "error": "connection refused", "tries": 3, "duration_ms": 1},
                        {"attempt": 3, "outcome": "PENDING", "status_code": 503, "error": "HTTP 503", "tries": 3, "duration_ms": 9}]'
    """,  # noqa: E501
    "leased": """
        attempts = 1, locked_until = now() + interval '30 seconds',
        claim_token = gen_random_uuid(), last_error = 'timeout',
        attempt_log = '[{"attempt": 1, "outcome": "PENDING", "status_code": null, "error": "timeout", "tries": 3, "duration_ms": 10000}]'
    """,  # noqa: E501
    "delivered": """
        status = 'DELIVERED', attempts = 1, delivered_at = now() - interval '1 minute',
        last_status_code = 200, last_attempt_at = now() - interval '1 minute',
        attempt_log = '[{"attempt": 1, "outcome": "DELIVERED", "status_code": 200, "error": null, "tries": 1, "duration_ms": 4}]'
    """,  # noqa: E501
    "dead": """
        status = 'DEAD', attempts = 12, last_error = 'HTTP 500', last_status_code = 500,
        last_attempt_at = now() - interval '1 hour',
        attempt_log = '[{"attempt": 12, "outcome": "DEAD", "status_code": 500, "error": "HTTP 500", "tries": 3, "duration_ms": 30}]'
    """,  # noqa: E501
}


async def insert_payment_with_event(conn: asyncpg.Connection, trip_id: int, state: str) -> int:
    """A charged payment and its `payment.succeeded` event as version 5 wrote them, then the event
    put in `state` as the relay of version 5 would have; returns the event's id."""
    event_id: int = await conn.fetchval(
        """
        WITH payment AS (
            INSERT INTO payments (trip_id, amount, currency, method, status, reference,
                                  idempotency_hash)
            VALUES ($1::bigint, 100.00, 'INR', 'CARD', 'SUCCESS',
                    'PAY-20260101-' || lpad(to_hex($1::bigint), 8, '0'),
                    encode(sha256(convert_to($1::text, 'UTF8')), 'hex'))
         RETURNING payments
        )
        INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
        SELECT e.id, 'payment.succeeded', (p.payments).payment_id,
               payment_event_json(p.payments, e.id, 'payment.succeeded')
          FROM payment AS p, (SELECT gen_random_uuid() AS id) AS e
        RETURNING id
        """,
        trip_id,
    )
    if STATES[state]:
        await conn.execute(f"UPDATE outbox_events SET {STATES[state]} WHERE id = $1", event_id)
    return event_id


@pytest.fixture
async def version_5(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    async with migrated_before(empty_database_url, SUBSCRIPTIONS_VERSION) as conn:
        yield conn


async def rows_by_id(conn: asyncpg.Connection, sql: str) -> dict[int, dict[str, Any]]:
    return {row["id"]: dict(row) for row in await conn.fetch(sql)}


async def test_every_event_becomes_one_delivery_to_notification_in_its_state(
    version_5: asyncpg.Connection, empty_database_url: str
) -> None:
    conn = version_5
    events = {
        state: await insert_payment_with_event(conn, trip, state)
        for trip, state in enumerate(STATES, start=501)
    }
    columns = ", ".join(STATE_COLUMNS)
    before = await rows_by_id(
        conn,
        f"SELECT id, event_id, event_type, aggregate_id, payload::text AS payload, {columns}"
        "  FROM outbox_events",
    )
    assert len(before) == len(STATES)

    await migrate(conn)

    (notification,) = await conn.fetch("SELECT endpoint_id, name, url, state FROM endpoints")
    assert (notification["name"], notification["url"], notification["state"]) == (
        "notification",
        None,  # seeding from NOTIFICATION_SERVICE_URL fills it in
        "ACTIVE",
    )
    # Nothing lost: every event is still there, as it was.
    after = await rows_by_id(
        conn,
        "SELECT id, event_id, event_type, aggregate_id, payload::text AS payload"
        "  FROM outbox_events",
    )
    assert after == {
        id_: {key: row[key] for key in ("id", "event_id", "event_type", "aggregate_id", "payload")}
        for id_, row in before.items()
    }
    # Exactly one delivery per event, to `notification`, carrying the event's state.
    deliveries = await conn.fetch(
        f"SELECT event_id AS id, endpoint_id, aggregate_id, counted_attempts, {columns}"
        "  FROM deliveries"
    )
    assert sorted(d["id"] for d in deliveries) == sorted(before)
    for delivery in deliveries:
        old = before[delivery["id"]]
        assert delivery["endpoint_id"] == notification["endpoint_id"]
        assert delivery["aggregate_id"] == old["aggregate_id"]
        assert {c: delivery[c] for c in STATE_COLUMNS} == {c: old[c] for c in STATE_COLUMNS}
        # Attempts made before the breaker existed all counted toward RELAY_MAX_ATTEMPTS.
        assert delivery["counted_attempts"] == old["attempts"]

    by_state = {state: before[event] for state, event in events.items()}
    assert by_state["delivered"]["status"] == "DELIVERED"  # the arrangement did what it says
    assert len(json.loads(by_state["retrying"]["attempt_log"])) == 3
    assert by_state["leased"]["claim_token"] is not None
    delivered_now = await conn.fetchval(
        "SELECT array_agg(event_id ORDER BY event_id) FROM deliveries WHERE status = 'DELIVERED'"
    )
    assert delivered_now == [events["delivered"]], "nothing delivered is sent again"
    pending_now = await conn.fetchval(
        "SELECT array_agg(event_id ORDER BY event_id) FROM deliveries WHERE status = 'PENDING'"
    )
    assert pending_now == sorted([events["never tried"], events["retrying"], events["leased"]])

    # The delivery state left outbox_events.
    left = await conn.fetchval(
        "SELECT array_agg(column_name::text) FROM information_schema.columns"
        " WHERE table_name = 'outbox_events' AND column_name = ANY ($1::text[])",
        [column for column in STATE_COLUMNS if column != "created_at"],
    )
    assert left is None

    # The new API writes its next event on the upgraded rows, fanned out to `notification`.
    payment_id = by_state["delivered"]["aggregate_id"]
    async with running_api(empty_database_url) as api:
        refunded = await post_json(
            api.client,
            f"/payments/{payment_id}/refunds",
            {"idempotency_key": "after-upgrade", "amount": Decimal("10.00")},
        )
        assert refunded.status_code == 200, refunded.text
        assert exact_json(refunded)["remaining_amount"] == Decimal("90.00")
    new = await conn.fetch(
        "SELECT e.event_type, d.endpoint_id, d.status FROM deliveries AS d"
        "  JOIN outbox_events AS e ON e.id = d.event_id"
        " WHERE d.aggregate_id = $1 ORDER BY d.delivery_id",
        payment_id,
    )
    assert [tuple(row) for row in new] == [
        ("payment.succeeded", notification["endpoint_id"], "DELIVERED"),
        ("payment.refunded", notification["endpoint_id"], "PENDING"),
    ]
