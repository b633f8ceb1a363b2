"""`database.acquire`: when handing a connection back to its pool fails, what the block did stands.

The relay's pool resets each connection as it is returned (a query). If the server goes away at
that moment (a failover: seen as asyncpg's InternalClientError on the reset, in a failover run),
the reset fails after the block's work was done and committed — a claim of deliveries, say. That
failure must not replace the block's outcome: the claimed deliveries would otherwise be lost to
the relay until their lease ran out. The server going away is real here: the reset has the
connection's backend terminated (and waits for it to exit) before it runs its query.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from payment_service.database import acquire, create_pool

Reset = Callable[[asyncpg.Connection], Awaitable[None]]


async def _pool(database_url: str, reset: Reset) -> asyncpg.Pool:
    return await create_pool(database_url, min_size=0, max_size=2, reset=reset)


async def test_the_server_going_away_while_a_connection_is_returned_keeps_the_blocks_result(
    database_url: str, db: asyncpg.Connection
) -> None:
    killed: list[int] = []

    async def reset_on_a_dead_server(conn: asyncpg.Connection) -> None:
        if not killed:
            killed.append(conn.get_server_pid())
            assert await db.fetchval("SELECT pg_terminate_backend($1, 10000)", killed[0])
        await conn.execute("SELECT 1")

    pool = await _pool(database_url, reset_on_a_dead_server)
    try:
        async with acquire(pool, timeout=None) as conn:
            answer = await conn.fetchval("SELECT 42")
        assert answer == 42
        assert killed, "the reset never ran"
        # The pool goes on with a new connection (on a new backend).
        async with acquire(pool) as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") != killed[0]
    finally:
        await pool.close()


async def test_a_failing_reset_on_a_live_server_is_logged_and_the_block_still_stands(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    failures: list[int] = []

    async def broken_reset(conn: asyncpg.Connection) -> None:
        if not failures:
            failures.append(conn.get_server_pid())
            raise ValueError("a bug in the reset")

    pool = await _pool(database_url, broken_reset)
    try:
        with caplog.at_level(logging.WARNING, logger="payment_service.database"):
            async with acquire(pool) as conn:
                answer = await conn.fetchval("SELECT 7")
        assert answer == 7
        assert failures
        warnings = [r for r in caplog.records if "failed when returned to its pool" in r.message]
        assert len(warnings) == 1 and warnings[0].exc_info is not None
        async with acquire(pool) as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_an_error_in_the_block_is_not_replaced_by_a_failing_release(
    database_url: str,
) -> None:
    async def broken_reset(conn: asyncpg.Connection) -> None:
        raise ValueError("a bug in the reset")

    pool = await _pool(database_url, broken_reset)
    try:
        with pytest.raises(KeyError, match="the block's own"):
            async with acquire(pool) as conn:
                await conn.fetchval("SELECT 1")
                raise KeyError("the block's own")
    finally:
        await pool.close()
