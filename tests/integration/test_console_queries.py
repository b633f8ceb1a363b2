"""What the console reads, against a real PostgreSQL: each endpoint's backlog, an endpoint's
latest, failing and dead deliveries with their last attempts, a payment's events with their
deliveries and attempts, and the payment search; and EXPLAIN of every one of those statements
over a large history, so that a page costs what it shows, not what the table holds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from app import payments
from app.console.views import LAGGING_SECONDS, attention_first
from payment_service import deliveries, endpoints
from payment_service.deliveries import Backlog
from payment_service.money import history, review
from tests.support.audit import OPERATOR
from tests.support.database import insert_events

NOW = datetime(2026, 1, 31, 3, 30, tzinfo=UTC)
LATER = timedelta(minutes=5)
ATTEMPT = {
    "attempt": 1,
    "at": "2026-01-31T03:30:00+00:00",
    "outcome": "PENDING",
    "status_code": 500,
    "error": "HTTP 500: <script>x()</script>",
    "tries": 2,
    "duration_ms": 41,
    "signed_with": "0123456789ab ba9876543210",
}


async def _fail(db: asyncpg.Connection, event_ids: list[int], status: str, endpoint: str) -> None:
    """Give these events' deliveries to `endpoint` a failed attempt and `status`."""
    await db.execute(
        """
        UPDATE deliveries AS d
           SET status = $3,
               attempts = 1,
               last_status_code = 500,
               last_error = 'HTTP 500: <script>x()</script>',
               last_attempt_at = now(),
               attempt_log = jsonb_build_array($2::text::jsonb)
          FROM endpoints AS n
         WHERE n.endpoint_id = d.endpoint_id
           AND n.name = $4
           AND d.event_id = ANY ($1::bigint[])
        """,
        event_ids,
        json.dumps(ATTEMPT),
        status,
        endpoint,
    )


async def test_an_endpoints_backlog_and_deliveries(db: asyncpg.Connection) -> None:
    async with db.transaction():
        await endpoints.insert_endpoint(
            db, name="trip", url="http://127.0.0.1:9/t", operator=OPERATOR
        )
    events = await insert_events(db, payments=6)
    await _fail(db, [e.id for e in events[:2]], "DEAD", "trip")
    await _fail(db, [e.id for e in events[2:3]], "PENDING", "trip")
    await db.execute(
        "UPDATE deliveries SET status = 'DELIVERED', delivered_at = now()"
        " WHERE status = 'PENDING' AND attempts = 0"
        " AND endpoint_id = (SELECT endpoint_id FROM endpoints WHERE name = 'trip')"
    )

    backlog = {b.name: b for b in await deliveries.select_backlog(db)}
    assert (backlog["trip"].pending, backlog["trip"].dead) == (1, 2)
    assert (backlog["notification"].pending, backlog["notification"].dead) == (6, 0)
    assert backlog["trip"].oldest_age_seconds is not None

    trip = await endpoints.select_endpoint(db, "trip")
    sent = await deliveries.select_endpoint_deliveries(db, endpoint_id=trip.endpoint_id, limit=10)
    assert [line.event_id for line in sent.dead] == [events[1].event_id, events[0].event_id]
    assert [line.event_id for line in sent.failing] == [events[2].event_id]
    assert [line.event_id for line in sent.latest] == [e.event_id for e in reversed(events)]
    failing = sent.failing[0]
    assert failing.last_attempt is not None
    assert failing.last_attempt.signed_with == ("0123456789ab", "ba9876543210")
    assert failing.last_attempt.error == "HTTP 500: <script>x()</script>"
    assert (failing.last_attempt.status_code, failing.last_attempt.duration_ms) == (500, 41)
    assert failing.payment_id == events[2].payment_id
    short = await deliveries.select_endpoint_deliveries(db, endpoint_id=trip.endpoint_id, limit=1)
    assert [len(short.latest), len(short.failing), len(short.dead)] == [1, 1, 1]


async def test_a_payments_events_with_their_deliveries_and_latest_attempts(
    db: asyncpg.Connection,
) -> None:
    async with db.transaction():
        await endpoints.insert_endpoint(
            db, name="trip", url="http://127.0.0.1:9/t", operator=OPERATOR
        )
    events = await insert_events(db, payments=1, events_per_payment=2)
    many = [{**ATTEMPT, "attempt": n} for n in range(1, deliveries.ATTEMPTS_SHOWN + 6)]
    await db.execute(
        """
        UPDATE deliveries SET attempt_log = $1::text::jsonb, attempts = $2
         WHERE event_id = $3
           AND endpoint_id = (SELECT endpoint_id FROM endpoints WHERE name = 'trip')
        """,
        json.dumps(many),
        len(many),
        events[0].id,
    )
    story = await deliveries.select_payment_events(db, payment_id=events[0].payment_id)
    assert [(e.event_id, e.event_type) for e in story] == [
        (events[0].event_id, "payment.succeeded"),
        (events[1].event_id, "payment.refunded"),
    ]
    first = {d.endpoint: d for d in story[0].deliveries}
    assert set(first) == {"notification", "trip"}
    assert first["notification"].attempt_log == [] and first["notification"].logged == 0
    shown = first["trip"].attempt_log
    assert first["trip"].logged == len(many)
    assert [a.attempt for a in shown] == [n for n in range(6, len(many) + 1)], "the latest"
    assert len(shown) == deliveries.ATTEMPTS_SHOWN
    assert shown[-1].signed_with == ("0123456789ab", "ba9876543210")
    assert await deliveries.select_payment_events(db, payment_id=999_999) == []


async def test_the_payment_search(db: asyncpg.Connection) -> None:
    events = await insert_events(db, payments=3)
    row = await db.fetchrow(
        "SELECT payment_id, trip_id, reference FROM payments WHERE payment_id = $1",
        events[1].payment_id,
    )

    async def ids(**terms: Any) -> list[int]:
        return [r["payment_id"] for r in await payments.select_payments_matching(db, **terms)]

    assert await ids(reference=row["reference"]) == [row["payment_id"]]
    assert await ids(trip_id=row["trip_id"]) == [row["payment_id"]]
    assert await ids(payment_id=row["payment_id"], trip_id=row["payment_id"]) != []
    assert await ids(reference="PAY-20250101-00000000") == []
    await _at_the_gateway(db)
    assert await ids(intent_id=f"pi_{row['payment_id']}") == [row["payment_id"]]
    assert await ids(gateway_refund_id=f"re_{row['payment_id']}") == [row["payment_id"]]
    assert await ids(intent_id="pi_0", gateway_refund_id="pi_0") == []
    assert await ids(intent_id=f"re_{row['payment_id']}") == [], "a refund's id is no intent"


def test_what_needs_attention_comes_first() -> None:
    def endpoint(name: str, **changes: object) -> endpoints.Endpoint:
        values: dict[str, object] = {
            "endpoint_id": 1, "name": name, "url": "http://x/", "event_types": ("*",),
            "secret": None, "previous_secrets": (), "state": "ACTIVE", "state_reason": None,
            "state_changed_at": NOW, "consecutive_failures": 0, "breaker_open_until": None,
            "breaker_cooldown_seconds": 0.0, "failing_since": None, "last_success_at": None,
            "seeded": False, "created_at": NOW, "updated_at": NOW, "now": NOW,
        }  # fmt: skip
        values.update(changes)
        return endpoints.Endpoint(**values)  # type: ignore[arg-type]

    def backlog(name: str, dead: int = 0, age: float | None = None) -> Backlog:
        return Backlog(name, 1 if age else 0, age, dead, "ACTIVE", "closed")

    found = [
        endpoint("fine"),
        endpoint("failing", consecutive_failures=2),
        endpoint("paused", state="PAUSED"),
        endpoint("lagging"),
        endpoint("dead-few"),
        endpoint("dead-many"),
        endpoint("open", breaker_open_until=NOW + LATER),
        endpoint("off", state="DISABLED"),
    ]
    counts = {
        "lagging": backlog("lagging", age=LAGGING_SECONDS + 1),
        "dead-few": backlog("dead-few", dead=1),
        "dead-many": backlog("dead-many", dead=9),
        "fine": backlog("fine", age=LAGGING_SECONDS - 1),
    }
    rows = attention_first(found, counts)
    assert [(row.name, row.why) for row in rows] == [
        ("off", "disabled"),
        ("open", "breaker"),
        ("dead-many", "dead"),
        ("dead-few", "dead"),
        ("lagging", "lagging"),
        ("paused", "paused"),
        ("failing", "failing"),
        ("fine", None),
    ]


async def _at_the_gateway(db: asyncpg.Connection, review_every: int = 0) -> None:
    """Every payment charged at the gateway (its intent `pi_<payment id>`), refunded there
    (`re_<payment id>`), with two webhooks; every `review_every`th charge flagged for review."""
    await db.execute(
        """
        INSERT INTO payment_refunds (payment_id, amount, idempotency_hash, gateway_refund_id)
        SELECT payment_id, 1, encode(sha256(payment_id::text::bytea), 'hex'), 're_' || payment_id
          FROM payments;
        INSERT INTO gateway_operations (kind, payment_id, phase, key_hash, caller, intent_id)
        SELECT 'CHARGE', payment_id, 'DONE', repeat('a', 64), 'default', 'pi_' || payment_id
          FROM payments;
        INSERT INTO gateway_operations
               (kind, payment_id, refund_id, phase, key_hash, caller, intent_id, gateway_refund_id)
        SELECT 'REFUND', payment_id, refund_id, 'DONE', repeat('b', 64), 'default',
               'pi_' || payment_id, 're_' || payment_id
          FROM payment_refunds;
        INSERT INTO gateway_events (event_id, gateway_type, object_id, payment_id, outcome,
                                    created_at)
        SELECT 'evt_' || payment_id || '_' || n, 'payment_intent.succeeded', 'pi_' || payment_id,
               payment_id, 'applied', now()
          FROM payments, generate_series(1, 2) AS n;
        """
    )
    if review_every:
        await db.execute(
            "UPDATE gateway_operations SET phase = 'REVIEW'"
            " WHERE kind = 'CHARGE' AND payment_id % $1 = 0",
            review_every,
        )


def _search(**terms: object) -> list[Any]:
    """The search's arguments: these terms, the others None."""
    names = ("payment_id", "trip_id", "reference", "intent_id", "gateway_refund_id")
    return payments.MATCHING.args(**{name: terms.get(name) for name in names}, limit=20)


async def _plan(db: asyncpg.Connection, sql: str, *args: object) -> str:
    return "\n".join(row[0] for row in await db.fetch("EXPLAIN " + sql, *args))


async def test_the_consoles_statements_cost_what_they_show(db: asyncpg.Connection) -> None:
    """EXPLAIN over 60,000 delivered deliveries (two endpoints) and a few pending and dead ones:
    no statement reads the deliveries or the events in full."""
    async with db.transaction():
        await endpoints.insert_endpoint(
            db, name="trip", url="http://127.0.0.1:9/t", operator=OPERATOR
        )
    await insert_events(db, payments=10_000, events_per_payment=3)
    await db.execute("UPDATE deliveries SET status = 'DELIVERED', delivered_at = now()")
    recent = await insert_events(db, payments=50)
    await _fail(db, [e.id for e in recent[:10]], "DEAD", "trip")
    await _fail(db, [e.id for e in recent[10:20]], "PENDING", "trip")
    await db.execute("ANALYZE")
    trip = (await endpoints.select_endpoint(db, "trip")).endpoint_id
    payment_id = recent[0].payment_id
    plans = {
        "backlog": await _plan(db, deliveries.BACKLOG.sql),
        "latest": await _plan(
            db,
            deliveries.LATEST.sql,
            *deliveries.LATEST.args(endpoint_id=trip, limit=10, window=deliveries.RECENT_WINDOW),
        ),
        "failing": await _plan(
            db, deliveries.FAILING.sql, *deliveries.FAILING.args(endpoint_id=trip, limit=10)
        ),
        "dead": await _plan(
            db,
            deliveries.DEAD_OF_ENDPOINT.sql,
            *deliveries.DEAD_OF_ENDPOINT.args(endpoint_id=trip, limit=10),
        ),
        "payment events": await _plan(
            db,
            deliveries.PAYMENT_EVENTS.sql,
            *deliveries.PAYMENT_EVENTS.args(payment_id=payment_id, shown_before_last=19),
        ),
        "search": await _plan(
            db,
            payments.MATCHING.sql,
            *_search(payment_id=payment_id, trip_id=payment_id, reference="PAY-TEST-1"),
        ),
    }
    for name, plan in plans.items():
        for table in ("deliveries", "outbox_events", "payments"):
            assert f"Seq Scan on {table}" not in plan, f"{name}:\n{plan}"
    assert "deliveries_dead_idx" in plans["dead"], plans["dead"]
    assert (
        "deliveries_due_idx" in plans["failing"]
        or "deliveries_pending_aggregate_idx" in (plans["failing"])
    ), plans["failing"]
    assert "outbox_events_aggregate_idx" in plans["payment events"], plans["payment events"]


async def test_the_consoles_gateway_statements_cost_what_they_show(db: asyncpg.Connection) -> None:
    """EXPLAIN over 20,000 payments charged and refunded at the gateway (40,000 operations, 40,000
    webhooks), a few hundred flagged for review: the search by a gateway id, a payment's story at
    the gateway and the review queue read through indexes, never a whole table."""
    await insert_events(db, payments=20_000, events_per_payment=1)
    await _at_the_gateway(db, review_every=97)
    await db.execute("ANALYZE")
    payment_id = await db.fetchval("SELECT max(payment_id) FROM payments")
    plans = {
        "search by intent": await _plan(
            db,
            payments.MATCHING.sql,
            *_search(intent_id="pi_5", gateway_refund_id="pi_5"),
        ),
        "operations": await _plan(
            db,
            history.OPERATIONS_OF_PAYMENT.sql,
            *history.OPERATIONS_OF_PAYMENT.args(payment_id=payment_id),
        ),
        "webhooks": await _plan(
            db,
            history.WEBHOOKS_OF_PAYMENT.sql,
            *history.WEBHOOKS_OF_PAYMENT.args(payment_id=payment_id, limit=51),
        ),
        "review page": await _plan(
            db, review.REVIEW_PAGE.sql, *review.REVIEW_PAGE.args(after=0, limit=21)
        ),
        "review count": await _plan(db, review.REVIEW_COUNT),
        "open charge": await _plan(
            db, review.OPEN_CHARGE.sql, *review.OPEN_CHARGE.args(payment_id=payment_id)
        ),
    }
    for name, plan in plans.items():
        for table in ("payments", "payment_refunds", "gateway_operations", "gateway_events"):
            assert f"Seq Scan on {table}" not in plan, f"{name}:\n{plan}"
    assert "gateway_operations_charge_intent" in plans["search by intent"]
    assert "payment_refunds_gateway_refund_idx" in plans["search by intent"]
    assert "gateway_operations_one_per_refund" in plans["operations"], plans["operations"]
    assert "gateway_events_payment_idx" in plans["webhooks"], plans["webhooks"]
    assert "gateway_operations_review_idx" in plans["review page"], plans["review page"]
    # Either partial index holds only the open operations, never the DONE ones.
    assert any(
        f"gateway_operations_{index}" in plans["review count"]
        for index in ("review_idx", "due_idx")
    ), plans["review count"]
    page = await review.select_review_page(db, limit=5)
    assert page.has_more and len(page.items) == 5
    assert [i.operation.payment_id % 97 for i in page.items] == [0] * 5
    story = await history.select_gateway_story(db, payment_id=payment_id)
    assert [(o.kind, o.intent_id) for o in story.operations] == [
        ("CHARGE", f"pi_{payment_id}"),
        ("REFUND", f"pi_{payment_id}"),
    ]
    assert len(story.webhooks) == 2 and not story.more_webhooks
