"""The relay's recorder against a real PostgreSQL: one result the database refuses never holds
back the others, and is never retried for ever."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from outbox_relay import outbox
from outbox_relay.metrics import RelayMetrics
from outbox_relay.outbox import AttemptRecord, ClaimedEvent
from outbox_relay.recorder import Recorder
from outbox_relay.state import RelayState
from payment_service.config import Settings
from payment_service.database import create_pool
from tests.support.database import claim, insert_events, set_endpoint_url


@pytest.fixture(autouse=True)
async def notification(conn: asyncpg.Connection) -> int:
    """The endpoint `notification` configured, as the relay's start-up seeding does."""
    return await set_endpoint_url(conn, "http://127.0.0.1:9/notifications")


@pytest.fixture
async def recorder(database_url: str) -> AsyncIterator[Recorder]:
    settings = Settings(_env_file=None, database_url=database_url)  # type: ignore[call-arg]
    pool = await create_pool(database_url, min_size=0, max_size=2)
    try:
        yield Recorder(RelayState(settings, RelayMetrics(), pool=pool))
    finally:
        await pool.close()


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
    conn: asyncpg.Connection, recorder: Recorder
) -> None:
    await insert_events(conn, payments=5)
    first, refused, middle, bogus, last = await claim(conn, 5)
    recorder.records = [
        result(first),
        result(refused, attempted_at=1e300),  # far beyond any timestamp: refused (22008)
        result(middle, "PENDING"),
        result(bogus, "BOGUS"),  # not a status the row can take (a CHECK violation, 23514)
        result(last),
    ]
    await recorder.write_results()
    assert recorder.records == []  # nothing left to retry for ever
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
