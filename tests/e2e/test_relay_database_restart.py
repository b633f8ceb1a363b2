"""The database restarts (even crashes) under a running relay: it reconnects and carries on.

This test runs its own embedded PostgreSQL so it can stop and start it. The relay's poll interval
is long (60 s), so events written after the restart arrive promptly only if its LISTEN connection
was re-established.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from payment_service.database import connect
from payment_service.embedded import EmbeddedPostgres
from payment_service.migrations import migrate
from tests.support.database import insert_events, status_counts
from tests.support.processes import RelayLauncher, dump_logs
from tests.support.receiver import OK as ANSWER_OK
from tests.support.receiver import Delivery, Receiver
from tests.support.waiting import wait_until


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "pgdata", settings=["fsync=off", "full_page_writes=off"])
    server.start()
    try:
        yield server
    finally:
        server.stop(mode="immediate")


@pytest.fixture
async def own_database(own_postgres: EmbeddedPostgres) -> AsyncIterator[str]:
    own_postgres.ensure_database("payments")
    dsn = own_postgres.dsn("payments")
    conn = await connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    yield dsn


async def _delivered(dsn: str) -> int:
    conn = await connect(dsn)
    try:
        return (await status_counts(conn)).get("DELIVERED", 0)
    finally:
        await conn.close()


async def _insert(dsn: str, payments: int) -> set[str]:
    conn = await connect(dsn)
    try:
        return {e.event_id for e in await insert_events(conn, payments=payments)}
    finally:
        await conn.close()


async def test_the_relay_reconnects_after_a_database_restart(
    tmp_path: Path, own_postgres: EmbeddedPostgres, own_database: str, receiver: Receiver
) -> None:
    async def slowish(_d: Delivery):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.01)
        return ANSWER_OK

    receiver.policy = slowish
    launcher = RelayLauncher(tmp_path, own_database, receiver)
    try:
        relay = launcher.start(relay_poll_interval=60, relay_concurrency=8)
        await wait_until(lambda: relay.logged("listening for new events") == 1, timeout=30)
        first = await _insert(own_database, 400)
        await wait_until(lambda: len(receiver.accepted_ids()) >= 50, timeout=30)

        # A crash of the database in the middle of the batch: no checkpoint, connections cut.
        await asyncio.to_thread(own_postgres.kill)
        await wait_until(
            lambda: relay.logged("database unavailable; loop restarts after a delay") > 0,
            timeout=30,
        )
        await asyncio.to_thread(own_postgres.start)  # same data directory, same port
        await wait_until(lambda: relay.logged("listening for new events") >= 2, timeout=60)
        await wait_until(lambda: first <= receiver.accepted_ids(), timeout=60)

        # Written after the restart: only the re-established LISTEN wakes the relay in time.
        second = await _insert(own_database, 20)
        await wait_until(lambda: second <= receiver.accepted_ids(), timeout=10)
        await wait_until(lambda: _count_is(own_database, len(first | second)), timeout=30)
        assert relay.process is not None and relay.process.poll() is None, dump_logs([relay])
        # duplicates only of events whose result could not be written while the database was down
        assert max(receiver.accepted_counts().values()) <= 2
    finally:
        launcher.stop_all()


async def _count_is(dsn: str, count: int) -> bool:
    return await _delivered(dsn) == count


async def test_a_relay_started_while_the_database_is_down_waits_for_it(
    tmp_path: Path, own_postgres: EmbeddedPostgres, own_database: str, receiver: Receiver
) -> None:
    await asyncio.to_thread(own_postgres.stop)
    launcher = RelayLauncher(tmp_path, own_database, receiver)
    try:
        relay = launcher.start(relay_poll_interval=60)
        await wait_until(
            lambda: relay.logged("database unavailable; loop restarts after a delay") > 0,
            timeout=30,
        )
        assert relay.process is not None and relay.process.poll() is None
        await asyncio.to_thread(own_postgres.start)
        await wait_until(lambda: relay.logged("listening for new events") >= 1, timeout=60)
        ids = await _insert(own_database, 10)
        await wait_until(lambda: ids <= receiver.accepted_ids(), timeout=10)
    finally:
        launcher.stop_all()
