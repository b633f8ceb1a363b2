"""`payment-service outbox stats | dead | replay` per endpoint, as a user runs them: the real
command against a real PostgreSQL, the deliveries read back (no relay runs here)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta

import asyncpg
import pytest

from payment_service import OUTBOX_CHANNEL, deliveries, endpoints
from payment_service.database import connect
from payment_service.sql import Statement
from tests.support.commands import outbox_command
from tests.support.database import EventRow, fan_out, insert_events
from tests.support.waiting import wait_until

TRIP_TYPES = ("payment.succeeded",)


async def add_trip(conn: asyncpg.Connection, name: str = "trip") -> int:
    endpoint = await endpoints.insert_endpoint(
        conn, name=name, url="http://127.0.0.1:9/trips", event_types=TRIP_TYPES
    )
    return endpoint.endpoint_id


async def set_delivery(
    conn: asyncpg.Connection, events: list[EventRow], endpoint: str, assignments: str
) -> None:
    await conn.execute(
        f"UPDATE deliveries SET {assignments}"
        "  WHERE event_id = ANY($1)"
        "    AND endpoint_id = (SELECT endpoint_id FROM endpoints WHERE name = $2)",
        [e.id for e in events],
        endpoint,
    )


async def delivery_states(conn: asyncpg.Connection) -> dict[tuple[str, str], tuple[str, int]]:
    """(endpoint, event_id) -> (status, attempts)."""
    rows = await conn.fetch(
        "SELECT n.name, e.event_id::text, d.status, d.attempts"
        "  FROM deliveries AS d JOIN endpoints AS n USING (endpoint_id)"
        "  JOIN outbox_events AS e ON e.id = d.event_id"
    )
    return {(r["name"], r["event_id"]): (r["status"], r["attempts"]) for r in rows}


DEAD = "status = 'DEAD', attempts = 12, last_status_code = 503, last_error = 'HTTP 503: busy'"
DELIVERED = "status = 'DELIVERED', attempts = 1, delivered_at = now()"


async def test_stats_dead_and_replay_per_endpoint(
    conn: asyncpg.Connection, database_url: str
) -> None:
    await add_trip(conn)
    events = await insert_events(conn, payments=4)  # payment.succeeded: both endpoints want it
    assert await conn.fetchval("SELECT count(*) FROM deliveries") == 8
    await set_delivery(conn, events[:2], "trip", DEAD)
    await set_delivery(conn, events[:1], "notification", DEAD)
    await set_delivery(conn, events[2:], "notification", DELIVERED)
    await conn.execute(
        "UPDATE deliveries SET created_at = now() - interval '90 seconds'"
        " WHERE event_id = $1 AND endpoint_id = (SELECT endpoint_id FROM endpoints"
        "                                         WHERE name = 'trip')",
        events[3].id,
    )
    await endpoints.set_state(conn, "trip", "PAUSED")

    stats = outbox_command(database_url, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    numbers = json.loads(stats.stdout)
    by_name = {e["name"]: e for e in numbers["endpoints"]}
    trip, notification = by_name["trip"], by_name["notification"]
    assert (trip["pending"], trip["delivered"], trip["dead"], trip["due"]) == (2, 0, 2, 2)
    assert (trip["state"], trip["breaker"]) == ("PAUSED", "closed")
    assert 89 < trip["oldest_pending_age_seconds"] < 200
    assert (notification["pending"], notification["delivered"], notification["dead"]) == (1, 2, 1)
    assert (numbers["pending"], numbers["delivered"], numbers["dead"]) == (3, 2, 3)
    assert numbers["in_flight"] == 0 and numbers["oldest_pending_age_seconds"] > 89
    text = outbox_command(database_url, "stats").stdout
    assert "oldest pending" in text and "trip" in text and "PAUSED" in text

    dead = outbox_command(database_url, "dead", "--endpoint", "trip")
    assert dead.returncode == 0 and "HTTP 503: busy" in dead.stdout
    assert dead.stdout.count("trip") == 2 and "notification" not in dead.stdout
    listed = json.loads(outbox_command(database_url, "dead", "--json").stdout)
    assert {(d["endpoint"], d["event_id"]) for d in listed} == {
        ("trip", events[0].event_id),
        ("trip", events[1].event_id),
        ("notification", events[0].event_id),
    }
    assert {d["attempts"] for d in listed} == {12}
    unknown = outbox_command(database_url, "dead", "--endpoint", "nobody")
    assert unknown.returncode == 2 and "no endpoint named 'nobody'" in unknown.stderr

    # One event, one endpoint: only that delivery goes back in line.
    one = outbox_command(
        database_url, "replay", "--event-id", events[0].event_id, "--endpoint", "trip"
    )
    assert (one.returncode, one.stdout.strip()) == (0, "replayed 1 delivery(ies) to trip")
    states = await delivery_states(conn)
    assert states[("trip", events[0].event_id)] == ("PENDING", 0)
    assert states[("notification", events[0].event_id)] == ("DEAD", 12)
    again = outbox_command(database_url, "replay", "--event-id", events[2].event_id)
    assert again.returncode == 1
    assert "no DEAD delivery (notification DELIVERED, trip PENDING)" in again.stderr
    missing = outbox_command(database_url, "replay", "--event-id", str(uuid.uuid4()))
    assert missing.returncode == 1 and "no such event" in missing.stderr
    bad = outbox_command(database_url, "replay", "--event-id", "not-a-uuid")
    assert bad.returncode == 2 and "is not a UUID" in bad.stderr
    neither = outbox_command(database_url, "replay")
    assert neither.returncode == 2 and "--event-id ID, --dead" in neither.stderr

    rest = outbox_command(database_url, "replay", "--dead")
    assert rest.stdout.strip() == "replayed 2 delivery(ies) to notification, trip"
    assert outbox_command(database_url, "dead").stdout.strip() == "no dead deliveries"
    replayed = await conn.fetch(
        "SELECT attempts, counted_attempts, next_attempt_at <= now() AS due FROM deliveries"
        " WHERE status = 'PENDING' AND event_id = ANY($1)",
        [e.id for e in events[:2]],
    )
    assert len(replayed) == 4  # both to trip, both to notification (one never died)
    assert all(r["attempts"] == 0 and r["counted_attempts"] == 0 and r["due"] for r in replayed)


async def test_replaying_a_delivery_older_than_one_its_endpoint_got_warns_first(
    conn: asyncpg.Connection, database_url: str
) -> None:
    stale, newer = await insert_events(conn, payments=1, events_per_payment=2)
    await conn.execute(
        "UPDATE outbox_events SET payload = payload || jsonb_build_object('sequence', s.seq)"
        "  FROM unnest($1::bigint[], $2::int[]) AS s(id, seq) WHERE outbox_events.id = s.id",
        [stale.id, newer.id],
        [stale.seq, newer.seq],
    )
    await endpoints.insert_endpoint(conn, name="audit", url="http://127.0.0.1:9/a")
    await fan_out(conn)
    for endpoint in ("notification", "audit"):
        await set_delivery(conn, [stale], endpoint, DEAD)
    await set_delivery(conn, [newer], "notification", DELIVERED)  # audit still waits for it

    replay = outbox_command(database_url, "replay", "--dead")

    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.strip() == "replayed 2 delivery(ies) to audit, notification"
    warnings = [line for line in replay.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, replay.stderr
    assert f"event {stale.event_id} (payment {stale.payment_id}, sequence 1)" in warnings[0]
    assert (
        f"delivered to notification: {newer.event_id} (payment.refunded, sequence 2)"
        in (warnings[0])
    )


async def test_replay_since_sends_an_endpoint_every_event_of_its_types_in_the_range_again(
    conn: asyncpg.Connection, database_url: str
) -> None:
    now: datetime = await conn.fetchval("SELECT now()")
    # Three payments, each charged then refunded, written 3 h, 2 h and 1 h ago.
    events = await insert_events(conn, payments=3, events_per_payment=2)
    for hours, pair in zip((3, 2, 1), (events[0:2], events[2:4], events[4:6]), strict=True):
        await conn.execute(  # the event and its delivery, written in one transaction
            "WITH e AS (UPDATE outbox_events SET created_at = $2 WHERE id = ANY($1) RETURNING id)"
            " UPDATE deliveries SET created_at = $2 WHERE event_id IN (SELECT id FROM e)",
            [e.id for e in pair],
            now - timedelta(hours=hours),
        )
    await conn.execute(
        "UPDATE deliveries SET status = 'DELIVERED', attempts = 1, delivered_at = now(),"
        '       attempt_log = \'[{"attempt": 1, "outcome": "DELIVERED"}]\''
    )
    await add_trip(conn)  # subscribes after every event: it has no delivery
    listener = await connect(database_url)
    notified: list[str] = []
    await listener.add_listener(OUTBOX_CHANNEL, lambda *args: notified.append(args[2]))
    try:
        since = (now - timedelta(hours=2, minutes=30)).isoformat()
        until = (now - timedelta(minutes=30)).isoformat()
        late = outbox_command(
            database_url, "replay", "--endpoint", "trip", "--since", since, "--until", until
        )
        assert late.returncode == 0, late.stderr
        assert "2 it never had, 0 sent or tried before" in late.stdout
        await wait_until(lambda: notified, timeout=5)
    finally:
        await listener.close()
    states = await delivery_states(conn)
    # trip: the charges of the 2 h and 1 h old payments (its types), nothing older or refunded.
    assert {key: v for key, v in states.items() if key[0] == "trip"} == {
        ("trip", events[2].event_id): ("PENDING", 0),
        ("trip", events[4].event_id): ("PENDING", 0),
    }

    # notification got everything; from 2 h ago on (inclusive) it gets it all again.
    start = (now - timedelta(hours=2)).isoformat()
    again = outbox_command(database_url, "replay", "--endpoint", "notification", "--since", start)
    assert again.returncode == 0, again.stderr
    assert "4 event(s) in line again (0 it never had, 4 sent or tried before)" in again.stdout
    rows = await conn.fetch(
        "SELECT e.event_id::text, d.status, d.attempts, d.delivered_at, d.attempt_log::text"
        "  FROM deliveries AS d JOIN outbox_events AS e ON e.id = d.event_id"
        " WHERE d.endpoint_id = (SELECT endpoint_id FROM endpoints WHERE name = 'notification')"
    )
    status = {r["event_id"]: r["status"] for r in rows}
    assert [status[e.event_id] for e in events] == ["DELIVERED"] * 2 + ["PENDING"] * 4
    for row in rows:
        assert len(json.loads(row["attempt_log"])) == 1  # history kept
        if row["status"] == "PENDING":
            assert row["attempts"] == 0 and row["delivered_at"] is None

    await endpoints.set_state(conn, "trip", "DISABLED", reason="gone")
    waits = outbox_command(database_url, "replay", "--endpoint", "trip", "--since", start)
    assert waits.returncode == 0 and "endpoints enable trip" in waits.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--endpoint", "trip", "--since", "2025-01-01T00:00:00"), "has no offset"),
        (("--endpoint", "trip", "--since", "yesterday"), "is not an ISO 8601 time"),
        (
            ("--endpoint", "trip", "--since", "2025-01-02T00:00Z", "--until", "2025-01-01T00:00Z"),
            "--until must be later than --since",
        ),
        (("--endpoint", "nobody", "--since", "2025-01-01T00:00Z"), "no endpoint named 'nobody'"),
        (("--since", "2025-01-01T00:00Z"), "needs --endpoint N --since T"),
        (("--dead", "--since", "2025-01-01T00:00Z"), "replace --event-id and --dead"),
    ],
)
async def test_replay_since_refuses_bad_input(
    conn: asyncpg.Connection, database_url: str, args: tuple[str, ...], message: str
) -> None:
    await add_trip(conn)
    result = outbox_command(database_url, "replay", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


async def _plan(conn: asyncpg.Connection, statement: Statement, **values: object) -> str:
    """The plan of `statement` as it runs: its compiled text, its values by name."""
    rows = await conn.fetch("EXPLAIN " + statement.sql, *statement.args(**values))
    return "\n".join(row[0] for row in rows)


async def test_the_commands_statements_use_indexes(conn: asyncpg.Connection) -> None:
    """EXPLAIN `dead`, `replay --dead` and `replay --since` over 30,000 delivered deliveries
    of older events."""
    await insert_events(conn, payments=10_000, events_per_payment=3)
    await conn.execute("UPDATE deliveries SET status = 'DELIVERED', delivered_at = now()")
    await conn.execute("UPDATE outbox_events SET created_at = now() - interval '1 day'")
    await insert_events(conn, payments=10)  # the last hour's, to replay
    await conn.execute("ANALYZE outbox_events; ANALYZE deliveries")
    since = await conn.fetchval("SELECT now() - interval '1 hour'")
    plans = {
        "dead": await _plan(conn, deliveries.DEAD, endpoint_id=None, limit=50),
        "replay --dead": await _plan(
            conn, deliveries.REPLAY_DEAD, event_id=None, endpoint_id=None, channel=OUTBOX_CHANNEL
        ),
        "replay --since": await _plan(
            conn,
            deliveries.REPLAY_RANGE,
            endpoint_id=1,
            since=since,
            until=None,
            event_types=["*"],
            channel=OUTBOX_CHANNEL,
        ),
    }
    for name, plan in plans.items():
        assert "Seq Scan on deliveries" not in plan, f"{name}:\n{plan}"
    # A range replay reads the range of events by their creation time.
    plan = plans["replay --since"]
    assert "outbox_events_created_at_idx" in plan, plan
