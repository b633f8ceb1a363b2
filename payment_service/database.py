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
from payment_service.sql import Statement

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
    # 25006: the node this connection reached takes no writes (a standby, or a demoted primary);
    # the pool is expired when it is seen, so the next connections look for the primary again.
    asyncpg.ReadOnlySQLTransactionError,
)
# Errors raised on a connection that say its server is gone or no longer the primary: every other
# connection of its pool points at the same node, so the whole pool is expired when one is seen.
_SERVER_GONE_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.ReadOnlySQLTransactionError,
)
CONNECT_TIMEOUT_SECONDS = 5
COMMAND_TIMEOUT_SECONDS = 15
# A request waits at most this long for a pooled connection before answering 503.
ACQUIRE_TIMEOUT_SECONDS = 5
# After an asyncpg InternalClientError, how long to wait for the connection's socket to close
# before calling the error a bug (see `PooledConnection`). A server that exits sends its FATAL
# and closes at once, so the close follows within a few event-loop turns.
LOST_CONNECTION_GRACE_SECONDS = 1.0


class ConnectionLost(ConnectionError):
    """The connection broke under a query because its server went away (it is "unavailable")."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb comes back as text (passed through to clients untouched) and goes in from Python
    # objects; a Decimal (a metadata number) is written as its exact literal, never as a float.
    await conn.set_type_codec(
        "jsonb", encoder=exact_json.dumps, decoder=lambda text: text, schema="pg_catalog"
    )


class PooledConnection:
    """`async with acquire(pool) as conn`: a pooled connection, or TimeoutError after
    ACQUIRE_TIMEOUT_SECONDS. Unlike `pool.acquire(timeout=…)`, which wraps every acquire in
    `asyncio.wait_for` and so creates a task per request, this uses `asyncio.timeout`.

    When the database goes away, a pooled connection may have received the dying server's FATAL
    while idle and be handed out before its socket's end is read: asyncpg then raises
    InternalClientError ("cannot switch to state …; another operation is in progress") on the
    next query. That error is also what a bug (one connection used by two tasks at once) raises,
    so it is not unavailable in itself: it becomes `ConnectionLost` only when the connection
    turns out closed within LOST_CONNECTION_GRACE_SECONDS. Whenever a connection finds its server
    gone, the whole pool is expired: its siblings all point at the node that went away.
    """

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: asyncpg.Pool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        async with asyncio.timeout(self._timeout):
            self._conn = await self._pool.acquire()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: object,
    ) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # The error that showed the server gone, if any: the pool is then expired.
        gone = error if error is not None and await _server_gone(conn, error) else None
        try:
            await self._pool.release(conn)
        except Exception as release_error:
            # Returning it ran a query (the relay's pool resets sessions) that failed: asyncpg has
            # closed the connection and the pool makes a new one. What the block did stands — a
            # claim or a commit already answered, or the block's own error — so this never
            # replaces its outcome.
            if error is None:
                if await _server_gone(conn, release_error):
                    gone = release_error
                else:
                    logger.warning(
                        "a connection failed when returned to its pool; it was closed",
                        exc_info=release_error,
                    )
        if gone is not None:
            await self._pool.expire_connections()
            note_unavailable(gone)
            if gone is error and not isinstance(error, UNAVAILABLE_ERRORS):
                raise ConnectionLost(f"the database connection was lost: {error}") from error


async def _server_gone(conn: asyncpg.Connection, error: BaseException) -> bool:
    """Whether `error`, raised while using `conn`, means that its server is gone (or read-only).

    A client-side error counts when it follows one of those (asyncpg's "cannot call
    Transaction.__aexit__(): the underlying connection is closed", raised while the connection's
    loss propagates) or when the connection is closed; an InternalClientError also when the
    connection closes within LOST_CONNECTION_GRACE_SECONDS (see `PooledConnection`).
    """
    cause: BaseException | None = error
    for _ in range(10):  # the chain of causes, not endlessly
        if cause is None:
            break
        if isinstance(cause, _SERVER_GONE_ERRORS):
            return True
        cause = cause.__cause__ or cause.__context__
    if not isinstance(error, asyncpg.InterfaceError | asyncpg.InternalClientError):
        return False
    if _closed(conn):
        return True
    if not isinstance(error, asyncpg.InternalClientError):
        return False
    closed = asyncio.Event()

    def on_close(_conn: object) -> None:
        closed.set()

    conn.add_termination_listener(on_close)
    try:
        async with asyncio.timeout(LOST_CONNECTION_GRACE_SECONDS):
            await closed.wait()
    except TimeoutError:
        if _closed(conn):
            return True
        conn.remove_termination_listener(on_close)
        return False
    return True


def _closed(conn: asyncpg.Connection) -> bool:
    """Closed, or (a pool's proxy) already handed back to its pool because it closed."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # "connection has been released back to the pool"
        return True


# -- the switch, logged once each way ------------------------------------------------------------
class _Link:
    """What this process last knew of its database, so that losing it logs one warning and
    reaching it again one info line naming the node, however many requests and loops notice."""

    reached = False  # a connection has succeeded in this process
    lost = False  # and the database has been unavailable since
    node: str | None = None  # host:port of the node last reached after a loss


_link = _Link()
NODE_SQL = "SELECT host(inet_server_addr()), inet_server_port(), pg_is_in_recovery()"
STANDBY_SQL = "SELECT pg_is_in_recovery()"


def note_unavailable(error: BaseException) -> None:
    """The database could not be used: one warning when it was reachable until now (before
    the first connection, the caller's own start-up message says it)."""
    if _link.lost or not _link.reached:
        logger.debug("database unavailable", extra={"error": _error_name(error)})
        return
    _link.lost = True
    logger.warning(
        "database lost; retrying until a primary answers",
        extra={"node": _link.node, "error": _error_name(error)},
    )


async def _note_reached(conn: asyncpg.Connection) -> None:
    """A new connection: the first after a loss names the node it reached (one round trip, only
    then)."""
    _link.reached = True
    if not _link.lost:
        return
    address, port, standby = await conn.fetchrow(NODE_SQL)
    _link.node = f"{address}:{port}"
    _link.lost = False
    logger.info(
        "database reached",
        extra={"node": _link.node, "role": "standby" if standby else "primary"},
    )


def _pool_floor_noise(record: logging.LogRecord) -> bool:
    """Drop asyncpg's "Failed to restore the pool connection floor" warning, with its traceback,
    when the cause is the database being unavailable: the pool retries every second in every
    process while the database is away, and `note_unavailable` has already said so once. Any
    other cause (a bug in `init`, say) is kept."""
    if record.exc_info and record.exc_info[1] is not None:
        return not isinstance(record.exc_info[1], UNAVAILABLE_ERRORS)
    return True


logging.getLogger("asyncpg.pool").addFilter(_pool_floor_noise)


def _error_name(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:200]


def acquire(
    pool: asyncpg.Pool, *, timeout: float | None = ACQUIRE_TIMEOUT_SECONDS
) -> PooledConnection:
    """A pooled connection (see `PooledConnection`); `timeout=None` waits for one as long as it
    takes (the relay's loops, whose pool is sized for them, and which must not give up on a
    long housekeeping statement holding a connection)."""
    return PooledConnection(pool, timeout)


async def keep_session(_conn: asyncpg.Connection) -> None:
    """A pool `reset` that returns a connection as it is (the API's pools and the relay lanes'
    use it).

    asyncpg's default reset (`pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`) costs a
    round trip on every release: a tenth of the API's CPU per request in a py-spy profile. The
    API's and the lanes' connections leave no session state behind (no SET, cursors, LISTEN or
    session advisory locks: only transaction-scoped ones); asyncpg still rolls back a transaction
    left open before calling this. The relay's own pool keeps the default: its housekeeping holds
    a session advisory lock, which a failed unlock must not leave on a pooled connection.
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
        conn = await asyncpg.connect(*args, **kwargs)
    except TimeoutError as error:  # already an "unavailable" error, with its own name
        note_unavailable(error)
        raise
    except OSError as error:
        note_unavailable(error)
        raise DatabaseUnreachable(f"cannot connect to the database: {error}") from error
    except asyncpg.TargetServerAttributeNotMatched as error:
        note_unavailable(error)
        raise
    try:
        await _note_reached(conn)
    except BaseException:
        conn.terminate()
        raise
    return conn


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


# A session-level advisory lock: one process at a time does something (migrate, housekeeping).
TRY_ADVISORY_LOCK = Statement("SELECT pg_try_advisory_lock(:key)")
ADVISORY_UNLOCK = Statement("SELECT pg_advisory_unlock(:key)")


async def try_advisory_lock(conn: asyncpg.Connection, key: int) -> bool:
    """Take the session's advisory lock `key` if no other session holds it; whether it did."""
    return bool(await conn.fetchval(TRY_ADVISORY_LOCK.sql, *TRY_ADVISORY_LOCK.args(key=key)))


async def advisory_unlock(conn: asyncpg.Connection, key: int) -> None:
    """Release the session's advisory lock `key`."""
    await conn.execute(ADVISORY_UNLOCK.sql, *ADVISORY_UNLOCK.args(key=key))
