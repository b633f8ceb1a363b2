"""The relay's recorder against a real PostgreSQL: one result the database refuses never holds
back the others, and is never retried for ever; written again after a lost answer, it is known as
the relay's own; a server gone while the endpoint's health is recorded is the pool's to handle."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from outbox_relay import outbox
from outbox_relay.delivery import Deliverer
from outbox_relay.http import CallbackClient
from outbox_relay.lanes import Lane
from outbox_relay.metrics import RelayMetrics
from outbox_relay.outbox import AttemptRecord, ClaimedEvent
from outbox_relay.recorder import Recorder
from outbox_relay.state import RelayState
from payment_service.callback_urls import network_policy
from payment_service.config import Settings
from payment_service.database import create_pool
from payment_service.endpoints import select_endpoint
from tests.support.database import claim, insert_events, set_endpoint_url


@pytest.fixture(autouse=True)
async def notification(conn: asyncpg.Connection) -> int:
    """The endpoint `notification` configured, as the relay's start-up seeding does."""
    return await set_endpoint_url(conn, "http://127.0.0.1:9/notifications")


@pytest.fixture
async def recorder(database_url: str) -> Recorder:
    settings = Settings(_env_file=None, database_url=database_url)  # type: ignore[call-arg]
    return Recorder(RelayState(settings, RelayMetrics()))


@pytest.fixture
async def lane(conn: asyncpg.Connection, database_url: str) -> AsyncIterator[Lane]:
    """The lane of endpoint `notification`, with its own pool, as the relay opens it (nothing is
    sent here: only its recorder's writes run)."""
    endpoint = await select_endpoint(conn, "notification")
    assert endpoint.url is not None
    client = CallbackClient(
        endpoint.url,
        networks=network_policy(production=False),
        max_connections=1,
        timeout=1,
        user_agent="test",
    )
    deliverer = Deliverer(
        client,
        signing_keys=[],
        request_timeout=1,
        quick_retries=0,
        quick_retry_wait=0,
        max_attempts=5,
        schedule=(5.0,),
        stopping=lambda: False,
    )
    lane = Lane(endpoint, client, deliverer)
    lane.pool = await create_pool(database_url, min_size=0, max_size=2)
    try:
        yield lane
    finally:
        await lane.pool.close()


def result(event: ClaimedEvent, status: str = "DELIVERED", **fields: object) -> AttemptRecord:
    values: dict[str, object] = {
        "delay": 0.0 if status == "DELIVERED" else 5.0,
        "attempted_at": time.time(),
        "status_code": 200 if status == "DELIVERED" else 500,
        "error": None if status == "DELIVERED" else "HTTP 500",
        "tries": 1,
        "duration_ms": 3,
    }
    values.update(fields)
    return AttemptRecord(id=event.id, claim_token=event.claim_token, status=status, **values)  # type: ignore[arg-type]


async def test_odd_receiver_answers_are_stored_safely_in_one_batch(
    conn: asyncpg.Connection,
) -> None:
    await insert_events(conn, payments=3)
    a, b, c = await claim(conn, 3)
    written = await outbox.record_attempts(
        conn,
        [
            result(a, "PENDING", status_code=999, error="HTTP/1.1 999 Odd: a\x00b"),
            result(b, "PENDING", status_code=500, error="HTTP 500: \ud800" + "x" * 1000),
            result(c),
        ],
    )
    assert len(written) == 3
    rows = await conn.fetch(
        "SELECT status, last_status_code, last_error, attempt_log FROM deliveries"
        " ORDER BY delivery_id"
    )
    assert [(r["status"], r["last_status_code"]) for r in rows] == [
        ("PENDING", None),
        ("PENDING", 500),
        ("DELIVERED", 200),
    ]
    assert rows[0]["last_error"] == "HTTP/1.1 999 Odd: a\ufffdb"
    assert rows[1]["last_error"].startswith("HTTP 500: \ufffdxxx")
    assert len(rows[1]["last_error"]) == outbox.ERROR_TEXT_LIMIT
    (entry,) = json.loads(rows[0]["attempt_log"])
    assert (entry["status_code"], entry["error"]) == (None, "HTTP/1.1 999 Odd: a\ufffdb")


async def test_a_result_the_database_refuses_never_holds_back_the_others(
    conn: asyncpg.Connection, recorder: Recorder, lane: Lane
) -> None:
    await insert_events(conn, payments=5)
    first, refused, middle, bogus, last = await claim(conn, 5)
    lane.unwritten.records = [
        result(first),
        result(refused, attempted_at=1e300),  # far beyond any timestamp: refused (22008)
        result(middle, "PENDING"),
        result(bogus, "BOGUS"),  # not a status the row can take (a CHECK violation, 23514)
        result(last),
    ]
    await recorder.write_results(lane)
    assert lane.unwritten.records == []  # nothing left to retry for ever
    rows = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT delivery_id AS id, status, attempts, last_status_code, last_error,"
            " claim_token FROM deliveries"
        )
    }
    assert [rows[e.id]["status"] for e in (first, middle, last)] == [
        "DELIVERED",
        "PENDING",
        "DELIVERED",
    ]
    # Refused details: the outcome is written without them.
    bare = rows[refused.id]
    assert (bare["status"], bare["attempts"], bare["last_status_code"]) == ("DELIVERED", 1, None)
    assert bare["last_error"] == (
        "the database refused this attempt's details (DatetimeFieldOverflowError)"
    )
    # Refused even bare: dropped, its claim stays until the lease runs out.
    assert (rows[bogus.id]["status"], rows[bogus.id]["attempts"]) == ("PENDING", 0)
    assert rows[bogus.id]["claim_token"] == bogus.claim_token
    assert all(rows[e.id]["claim_token"] is None for e in (first, refused, middle, last))


async def test_a_bare_result_written_again_after_its_answer_was_lost_is_known_as_its_own(
    conn: asyncpg.Connection, recorder: Recorder, lane: Lane, caplog: pytest.LogCaptureFixture
) -> None:
    """A result whose details the database refuses is written bare. Written again (the answer of
    the first write was lost, so the relay tries once more), the bare row is recognised as this
    relay's own: no lease is counted lost, no other relay blamed."""
    await insert_events(conn, payments=1)
    (event,) = await claim(conn, 1)
    refused = result(event, tries=2**31)  # beyond an int column: the driver refuses it
    lane.unwritten.records = [refused]
    await recorder.write_results(lane)
    lane.unwritten.records = [refused]  # the same result, written again
    await recorder.write_results(lane)
    row = await conn.fetchrow(
        "SELECT status, attempts, last_error FROM deliveries WHERE delivery_id = $1", event.id
    )
    assert (row["status"], row["attempts"]) == ("DELIVERED", 1)
    assert row["last_error"] == "the database refused this attempt's details (DataError)"
    assert recorder.state.metrics.registry.get_sample_value("relay_lost_leases_total") == 0
    assert not [r for r in caplog.records if "another relay owns it" in r.getMessage()]


async def test_a_server_gone_while_recording_health_expires_the_lanes_pool(
    conn: asyncpg.Connection, recorder: Recorder, lane: Lane, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection dies (its backend ends itself) while the endpoint's health is recorded,
    after the results were written. The pool's own handling sees it: the lane's pool is expired
    (no connection of before is handed out again) and the failure is logged as the database
    being unavailable, without a traceback; the results stand."""
    await insert_events(conn, payments=1)
    (event,) = await claim(conn, 1)
    async with lane.connection() as a, lane.connection() as b:  # both open, then idle
        before = {a.get_server_pid(), b.get_server_pid()}
    await conn.execute(
        """CREATE FUNCTION end_own_session() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$"""
    )
    await conn.execute(
        """CREATE TRIGGER end_own_session AFTER UPDATE ON endpoints FOR EACH ROW
           EXECUTE FUNCTION end_own_session()"""
    )
    lane.unwritten.records = [result(event)]
    await recorder.write_results(lane)
    await conn.execute("DROP TRIGGER end_own_session ON endpoints")

    status = await conn.fetchval("SELECT status FROM deliveries WHERE delivery_id = $1", event.id)
    assert status == "DELIVERED"
    async with lane.connection() as a, lane.connection() as b:
        after = {a.get_server_pid(), b.get_server_pid()}
    assert not before & after, (before, after)
    (warning,) = [
        r for r in caplog.records if r.getMessage() == "could not record the endpoint's health"
    ]
    assert warning.levelno == logging.WARNING
    assert not warning.exc_info
