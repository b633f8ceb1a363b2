"""`outbox replay --since` beside the relay's housekeeping: an old event whose deliveries were all
delivered past retention is what housekeeping deletes, and what a replay may be adding a delivery
for. Each test orders the two deterministically (a transaction left open, a row lock held in a
third session) and checks that the replay's delivery and its event are both there after: never a
foreign-key error, never a delivery the replay counted that the cascade then took away."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from outbox_relay.housekeeping import housekeep
from payment_service.database import connect
from payment_service.deliveries import replay_range
from payment_service.endpoints import insert_endpoint
from tests.support.database import insert_events, set_endpoint_url, waiting_for_a_lock
from tests.support.waiting import wait_for

RETENTION_HOURS = 168


@dataclass(frozen=True)
class Arranged:
    old: int  # delivered to `notification` past retention; `trip` never had it
    new: int  # recent, pending at both endpoints
    since: dt.datetime  # a replay range that holds both


@pytest.fixture
async def arranged(conn: asyncpg.Connection) -> Arranged:
    await set_endpoint_url(conn, "http://127.0.0.1:9/notifications")
    [old] = await insert_events(conn, payments=1)
    # `trip` subscribes after the old event was written (or was DISABLED then): no delivery.
    await insert_endpoint(conn, name="trip", url="http://127.0.0.1:9/trip")
    [new] = await insert_events(conn, payments=1)
    await conn.execute(
        "UPDATE outbox_events SET created_at = now() - interval '400 hours' WHERE id = $1", old.id
    )
    await conn.execute(
        "UPDATE deliveries SET status = 'DELIVERED', delivered_at = now() - interval '200 hours'"
        " WHERE event_id = $1",
        old.id,
    )
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=500)
    return Arranged(old.id, new.id, since)


@pytest.fixture
async def other(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A second session: the replay's."""
    connection = await connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def trip_delivery(conn: asyncpg.Connection, event_id: int) -> str | None:
    status: str | None = await conn.fetchval(
        "SELECT d.status FROM deliveries AS d JOIN endpoints AS ep USING (endpoint_id)"
        " WHERE ep.name = 'trip' AND d.event_id = $1",
        event_id,
    )
    return status


async def event_exists(conn: asyncpg.Connection, event_id: int) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM outbox_events WHERE id = $1", event_id))


async def test_housekeeping_leaves_an_event_a_replay_in_progress_adds_a_delivery_for(
    conn: asyncpg.Connection, other: asyncpg.Connection, database_url: str, arranged: Arranged
) -> None:
    """The replay has written its delivery but not committed; housekeeping runs meanwhile (its
    delivery to `notification` goes, the event looks unused). The event stays, and so does the
    replay's delivery once it commits (before, housekeeping waited for the replay's lock, then
    deleted the event, and the cascade took the delivery the replay had counted)."""
    housekeeper = await connect(database_url)
    try:
        async with other.transaction():
            done = await replay_range(other, endpoint="trip", since=arranged.since, until=None)
            assert (done.added, done.again) == (1, 1)
            passing = asyncio.create_task(housekeep(housekeeper, retention_hours=RETENTION_HOURS))

            async def finished_or_waiting() -> bool:
                return passing.done() or await waiting_for_a_lock(conn, "DELETE FROM outbox_events")

            await wait_for(finished_or_waiting, timeout=30, what="the housekeeping pass")
        result = await passing
    finally:
        await housekeeper.close()
    assert result.deliveries_deleted == 1  # the old event's delivery to notification
    assert await event_exists(conn, arranged.old)
    assert await trip_delivery(conn, arranged.old) == "PENDING"


async def test_a_replay_keeps_the_events_it_read_until_it_has_written_their_deliveries(
    conn: asyncpg.Connection, other: asyncpg.Connection, database_url: str, arranged: Arranged
) -> None:
    """The replay has read its events and is held (a third session locks the recent event's
    delivery to `trip`, which the replay puts back in line); housekeeping runs to its end
    meanwhile. The replay then finishes: no foreign-key error, the old event kept with its new
    delivery (before, housekeeping deleted the event, and the replay failed on the foreign key)."""
    holder = await connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM deliveries AS d JOIN endpoints AS ep USING (endpoint_id)"
                " WHERE ep.name = 'trip' AND d.event_id = $1 FOR UPDATE OF d",
                arranged.new,
            )
            replaying = asyncio.create_task(
                replay_range(other, endpoint="trip", since=arranged.since, until=None)
            )
            await wait_for(
                lambda: waiting_for_a_lock(conn, "WITH wanted"),
                timeout=30,
                what="the replay to wait for the held delivery",
            )
            result = await housekeep(conn, retention_hours=RETENTION_HOURS)
            assert result.deliveries_deleted == 1
            assert not replaying.done()
        done = await replaying
    finally:
        await holder.close()
    assert (done.added, done.again) == (1, 1)
    assert await event_exists(conn, arranged.old)
    assert await trip_delivery(conn, arranged.old) == "PENDING"
