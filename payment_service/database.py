"""Connections to PostgreSQL: one asyncpg pool per process, and the errors that mean "down"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from payment_service import exact_json

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DatabaseUnreachable(ConnectionError):
    """Connecting to the database failed: refused, unreachable, unknown host, no socket."""


# Errors that say "the database cannot be reached right now" (a 503 with Retry-After, a loop that
# waits), as opposed to a bug in a query (a logged 500 with its traceback). asyncpg's
# InterfaceError is not here: it is also what a wrong number of query arguments raises.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    DatabaseUnreachable,  # any OSError while connecting, see `connect`
    ConnectionError,  # a connection reset or broken mid-way
    TimeoutError,  # connecting, waiting for a pooled connection, a command (= asyncio's)
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08, and "connection was closed" mid-query
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.TargetServerAttributeNotMatched,  # failover: no read-write server among the hosts yet
)
CONNECT_TIMEOUT_SECONDS = 5
COMMAND_TIMEOUT_SECONDS = 15
# A request waits at most this long for a pooled connection before answering 503.
ACQUIRE_TIMEOUT_SECONDS = 5


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb comes back as text (passed through to clients untouched) and goes in from Python
    # objects; a Decimal (a metadata number) is written as its exact literal, never as a float.
    await conn.set_type_codec(
        "jsonb", encoder=exact_json.dumps, decoder=lambda text: text, schema="pg_catalog"
    )


class PooledConnection:
    """`async with acquire(pool) as conn`: a pooled connection, or TimeoutError after
    ACQUIRE_TIMEOUT_SECONDS. Unlike `pool.acquire(timeout=…)`, which wraps every acquire in
    `asyncio.wait_for` and so creates a task per request, this uses `asyncio.timeout`."""

    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        async with asyncio.timeout(ACQUIRE_TIMEOUT_SECONDS):
            self._conn = await self._pool.acquire()
        return self._conn

    async def __aexit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            await self._pool.release(self._conn)
            self._conn = None


def acquire(pool: asyncpg.Pool) -> PooledConnection:
    return PooledConnection(pool)


async def keep_session(_conn: asyncpg.Connection) -> None:
    """A pool `reset` that returns a connection as it is (the API's pool uses it).

    asyncpg's default reset (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`) costs a
    round trip on every release: a tenth of the API's CPU per request in a py-spy profile. The
    API's connections leave no session state behind (no SET, cursors, LISTEN or session advisory
    locks: only transaction-scoped ones); asyncpg still rolls back a transaction left open before
    calling this. The relay keeps the default: its housekeeping holds a session advisory lock,
    which a failed unlock must not leave on a pooled connection.
    """


async def create_pool(dsn: str, *, min_size: int, max_size: int, **kwargs: Any) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        connect=_connect_or_unreachable,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        timeout=CONNECT_TIMEOUT_SECONDS,
        command_timeout=COMMAND_TIMEOUT_SECONDS,
        **kwargs,
    )
    assert pool is not None
    return pool


async def _connect_or_unreachable(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """asyncpg.connect, with every OSError of connecting (refused, no route, unknown host, no
    such socket) raised as DatabaseUnreachable: nothing else is doing I/O at that moment."""
    try:
        return await asyncpg.connect(*args, **kwargs)
    except TimeoutError:  # already an "unavailable" error, with its own name
        raise
    except OSError as error:
        raise DatabaseUnreachable(f"cannot connect to the database: {error}") from error


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    conn = await _connect_or_unreachable(dsn, timeout=CONNECT_TIMEOUT_SECONDS, **kwargs)
    await _init_connection(conn)
    return conn


def run_with_connection(dsn: str, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run `action` on one new connection and close it: the body of a one-shot command."""

    async def go() -> T:
        conn = await connect(dsn)
        try:
            return await action(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


async def wait_for_database(dsn: str, *, timeout: float = 60) -> asyncpg.Connection:
    """Connect, retrying while the database is starting (compose, a fresh container)."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(UNAVAILABLE_ERRORS),
        wait=wait_exponential(multiplier=0.1, max=2),
        stop=stop_after_delay(timeout),
        before_sleep=before_sleep_log(logger, logging.INFO),
        reraise=True,
    ):
        with attempt:
            return await connect(dsn)
    raise AssertionError("unreachable")
