"""Databases for the tests: one real PostgreSQL per session, a migrated template, one clone per
test; a PostgreSQL of a test's own that it may stop; rows written as the service writes them.

The session's server comes from, in this order:
1. `TEST_DATABASE_URL` (any PostgreSQL whose user may CREATE DATABASE);
2. testcontainers' `PostgresContainer` when a Docker engine answers (image `TEST_POSTGRES_IMAGE`,
   default `postgres:16-alpine`, reached on 127.0.0.1);
3. the embedded PostgreSQL of the `pgserver` package otherwise.
Set `TEST_DATABASE_PROVIDER` to `url`, `docker` or `embedded` to insist on one.

`insert_events` writes payments, their outbox events and the events' deliveries straight into the
database, the way the API's transactions do (payload = `payment_event_json`, one delivery per
ACTIVE or PAUSED endpoint that wants the event's type, then NOTIFY). On a fresh test database the
one endpoint is `notification`, without a URL until a relay's start-up seeding gives it the test
receiver's (or `set_endpoint_url` does, for tests that run the relay's SQL without a relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from payment_service.embedded import EmbeddedPostgres
from payment_service.migrations import migrate
from tests.support.waiting import wait_for


@dataclass
class PostgresServer:
    provider: str
    admin_dsn: str
    embedded: object | None = None  # payment_service.embedded.EmbeddedPostgres when embedded

    def dsn(self, database: str) -> str:
        parts = urlsplit(self.admin_dsn)
        return urlunsplit(parts._replace(path="/" + database))


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
    except Exception:
        return False
    return True


def _start_container() -> tuple[str, Any]:
    # Read by testcontainers at import. Reach the published port on 127.0.0.1 directly, even where
    # /.dockerenv exists (as on some CI machines), which would make it go through 172.17.0.1.
    os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.postgres import PostgresContainer

    image = os.environ.get("TEST_POSTGRES_IMAGE", "postgres:16-alpine")
    container = PostgresContainer(
        image, username="postgres", password="test", dbname="postgres", driver=None
    )
    # Published on 127.0.0.1 only (a free port), never on every interface as by default.
    container.ports["5432"] = ("127.0.0.1",)  # type: ignore[assignment]
    container.with_command(
        "postgres -c fsync=off -c synchronous_commit=off "
        "-c full_page_writes=off -c max_connections=300"
    )
    container.start()
    return container.get_connection_url(), container


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    wanted = os.environ.get("TEST_DATABASE_PROVIDER", "")
    url = os.environ.get("TEST_DATABASE_URL")
    if wanted == "url" or (url and not wanted):
        if not url:
            pytest.fail("TEST_DATABASE_PROVIDER=url needs TEST_DATABASE_URL")
        _announce(f"[test database] provider=url server={urlsplit(url).hostname}")
        yield PostgresServer("url", url)
        return
    container = None
    if wanted == "docker":
        dsn, container = _start_container()
    elif not wanted and _docker_answers():
        try:
            dsn, container = _start_container()
        except Exception as error:  # e.g. the image cannot be had: fall back, and say so
            _announce(
                f"[test database] testcontainers failed ({type(error).__name__}: {error}); "
                "falling back to the embedded server"
            )
    if container is not None:
        _announce(
            f"[test database] provider=testcontainers image={container.image} "
            f"container={container.get_wrapped_container().short_id} dsn-host=127.0.0.1"
        )
        try:
            yield PostgresServer("testcontainers", dsn)
        finally:
            container.stop()
        return
    # Not under pytest's basetemp: pytest prunes old basetemps, and a concurrent session doing
    # so would delete a running server's data directory.
    base = Path(tempfile.mkdtemp(prefix="payments-test-pg-"))
    server = EmbeddedPostgres(
        base / "data",
        settings=[
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=300",
        ],
    )
    server.start()
    _announce(f"[test database] provider=embedded (pgserver) port={server.port}")
    try:
        yield PostgresServer("embedded", server.dsn(), embedded=server)
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)


announcements: list[str] = []  # shown in pytest's closing summary (tests/conftest.py)


def _announce(line: str) -> None:
    """Say which server serves the tests: now (shown with -s) and in pytest's closing summary."""
    print(f"\n{line}")
    announcements.append(line)


_TEMPLATE = f"payments_template_{uuid.uuid4().hex[:8]}"
_counter = itertools.count()


@pytest.fixture(scope="session")
async def template_database(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A database migrated once per session; each test gets a copy of it."""
    admin = await asyncpg.connect(postgres_server.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{_TEMPLATE}"')
        conn = await asyncpg.connect(postgres_server.dsn(_TEMPLATE))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield _TEMPLATE
        await admin.execute(f'DROP DATABASE IF EXISTS "{_TEMPLATE}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(
    postgres_server: PostgresServer, template_database: str
) -> AsyncIterator[str]:
    """A fresh, migrated database for this test; its DSN."""
    name = f"payments_test_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(postgres_server.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
        yield postgres_server.dsn(name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def empty_database_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = f"payments_empty_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(postgres_server.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield postgres_server.dsn(name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database, for arranging and asserting."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A folder outside pytest's basetemp, removed afterwards.

    An embedded PostgreSQL runs as an unprivileged user when the tests run as root, and must
    traverse every folder above its data; another pytest session on the machine re-tightens the
    permissions of /tmp/pytest-of-<user> (and prunes old basetemps), so data lives elsewhere.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- a PostgreSQL of one test's own ----------------------------------------------------------------
OWN_DATABASE_NAME = "payments"


class OneShotReads:
    """`fetch` and `fetchval` on a connection of their own, from the class's `connect()`."""

    async def connect(self) -> asyncpg.Connection:
        raise NotImplementedError

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await self.connect()
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        conn = await self.connect()
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()


class FaultDatabase(OneShotReads):
    """An embedded PostgreSQL that belongs to one test, so the test may stop and start it.

    fsync is off (a test survives process crashes, not power loss) but every commit still reaches
    the kernel before it is acknowledged (synchronous_commit stays on), so an immediate stop loses
    nothing that a client was told is committed.
    """

    def __init__(self, data_dir: Path) -> None:
        self.server = EmbeddedPostgres(
            data_dir,
            settings=["fsync=off", "full_page_writes=off", "max_connections=200"],
        )

    @property
    def dsn(self) -> str:
        return self.server.dsn(OWN_DATABASE_NAME)

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start)

    async def stop(self, *, immediate: bool = False) -> None:
        """Stop the server: `immediate` is a crash (no checkpoint, clients cut off)."""
        await asyncio.to_thread(self.server.stop, "immediate" if immediate else "fast")

    async def create(self) -> None:
        await self.start()
        await asyncio.to_thread(self.server.ensure_database, OWN_DATABASE_NAME)
        conn = await asyncpg.connect(self.dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=10)


# -- rows -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventRow:
    id: int
    event_id: str
    payment_id: int
    seq: int  # position among its payment's events, from 1


async def insert_events(
    conn: asyncpg.Connection, *, payments: int, events_per_payment: int = 1
) -> list[EventRow]:
    """Insert `payments` payments with `events_per_payment` outbox events each, then NOTIFY.

    A payment's events get increasing ids in the order they are to be delivered, and their
    deliveries are written as the API's fan-out writes them, in the same transaction.
    """
    async with conn.transaction():
        rows = await conn.fetch(
            """
        WITH base AS (
            SELECT coalesce(max(trip_id), 0) AS trip FROM payments
        ), p AS (
            INSERT INTO payments (trip_id, amount, currency, method, status, reference,
                                  idempotency_hash)
            SELECT base.trip + g, 100.00 + g, 'INR', 'CARD', 'SUCCESS',
                   'PAY-TEST-' || (base.trip + g),
                   encode(sha256(convert_to((base.trip + g)::text, 'UTF8')), 'hex')
              FROM base, generate_series(1, $1) AS g
         RETURNING payments
        ), e AS MATERIALIZED (
            SELECT gen_random_uuid() AS event_id, p.payments AS payment, s.seq
              FROM p CROSS JOIN generate_series(1, $2) AS s(seq)
        ), inserted AS (
            INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
            SELECT e.event_id,
                   CASE WHEN e.seq = 1 THEN 'payment.succeeded' ELSE 'payment.refunded' END,
                   (e.payment).payment_id,
                   payment_event_json(e.payment, e.event_id,
                       CASE WHEN e.seq = 1 THEN 'payment.succeeded' ELSE 'payment.refunded' END)
                   || jsonb_build_object('seq', e.seq)
              FROM e
             ORDER BY (e.payment).payment_id, e.seq
         RETURNING id, event_id, aggregate_id, (payload ->> 'seq')::int AS seq
        )
        SELECT id, event_id::text, aggregate_id, seq FROM inserted ORDER BY id
        """,
            payments,
            events_per_payment,
        )
        await fan_out(conn, sorted({r["aggregate_id"] for r in rows}))
    await conn.execute("SELECT pg_notify('outbox_events', '')")
    return [EventRow(r["id"], r["event_id"], r["aggregate_id"], r["seq"]) for r in rows]


async def status_counts(conn: asyncpg.Connection, endpoint: str | None = None) -> dict[str, int]:
    """Deliveries by status: to every endpoint, or to the one named."""
    rows = await conn.fetch(
        "SELECT d.status, count(*) AS n FROM deliveries AS d"
        " JOIN endpoints AS ep USING (endpoint_id)"
        " WHERE $1::text IS NULL OR ep.name = $1 GROUP BY d.status",
        endpoint,
    )
    return {r["status"]: r["n"] for r in rows}


async def recorded(
    conn: asyncpg.Connection, counts: dict[str, int], endpoint: str | None = None
) -> None:
    """Wait until the deliveries' statuses are `counts` (to every endpoint, or to the one named):
    a receiver sees a callback before the relay records its answer."""

    async def reached() -> bool:
        return await status_counts(conn, endpoint) == counts

    await wait_for(reached, timeout=30, what=f"deliveries recorded as {counts}")


async def claims_outstanding(conn: asyncpg.Connection) -> int:
    """Deliveries leased right now (or whose lease was never ended)."""
    return await conn.fetchval(
        "SELECT count(*) FROM deliveries WHERE claim_token IS NOT NULL OR locked_until IS NOT NULL"
    )


async def claim(conn: asyncpg.Connection, limit: int, lease_seconds: float = 30.0) -> list[Any]:
    """Every endpoint's claim, as each lane makes it, with a budget of `limit` each: their
    ClaimedEvents, endpoint by endpoint."""
    from outbox_relay import outbox

    claimed = []
    for endpoint_id in [
        r[0] for r in await conn.fetch("SELECT endpoint_id FROM endpoints ORDER BY endpoint_id")
    ]:
        claimed += await outbox.claim_deliveries(
            conn, endpoint_id, limit=limit, lease_seconds=lease_seconds
        )
    return claimed


async def set_endpoint_url(conn: asyncpg.Connection, url: str, name: str = "notification") -> int:
    """Give an endpoint its URL (as seeding does for `notification`); its id."""
    endpoint_id = await conn.fetchval(
        "UPDATE endpoints SET url = $2 WHERE name = $1 RETURNING endpoint_id", name, url
    )
    assert endpoint_id is not None, f"no endpoint {name!r}"
    return int(endpoint_id)


@pytest.fixture(name="conn")
async def conn_fixture(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database, set up as the relay's are (jsonb as text)."""
    from payment_service.database import connect

    connection = await connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def outbox_rows(db: Any, payment_id: int) -> list[dict[str, Any]]:
    """The outbox events of one payment, oldest first, with the payload decoded exactly, and
    `status`: their delivery's to `notification` (None when it has none)."""
    rows = await db.fetch(
        "SELECT e.id, e.event_id, e.event_type, e.aggregate_id, e.payload::text AS payload,"
        "       d.status"
        "  FROM outbox_events AS e"
        "  LEFT JOIN deliveries AS d"
        "    ON d.event_id = e.id"
        "   AND d.endpoint_id = (SELECT endpoint_id FROM endpoints WHERE name = 'notification')"
        " WHERE e.aggregate_id = $1 ORDER BY e.id",
        payment_id,
    )
    return [
        {**dict(row), "payload": json.loads(row["payload"], parse_float=Decimal)} for row in rows
    ]


# Every delivery with its event's columns, for the tests' reads (`SELECT … FROM {DELIVERY_ROWS}`):
# `id`, `event_id` (the uuid), `event_type`, `aggregate_id`, `payload` are the event's; `endpoint`
# is the endpoint's name; the rest is the delivery's state.
DELIVERY_ROWS = """(
    SELECT e.id, e.event_id, e.event_type, e.aggregate_id, e.payload, e.created_at,
           ep.name AS endpoint, d.delivery_id, d.status, d.attempts, d.counted_attempts,
           d.next_attempt_at, d.locked_until, d.claim_token, d.last_error, d.last_status_code,
           d.last_attempt_at, d.attempt_log, d.delivered_at
      FROM deliveries AS d
      JOIN outbox_events AS e ON e.id = d.event_id
      JOIN endpoints AS ep ON ep.endpoint_id = d.endpoint_id
) AS delivery_rows"""


# Deliveries written the way the API's fan-out writes them, for tests that arrange rows by SQL:
# one per (event, endpoint) for every ACTIVE or PAUSED endpoint whose types match.
# $1: the payments whose events get their deliveries (NULL: every event). Existing ones stay.
FAN_OUT_SQL = """
INSERT INTO deliveries (event_id, endpoint_id, aggregate_id, created_at)
SELECT e.id, n.endpoint_id, e.aggregate_id, e.created_at
  FROM outbox_events AS e
  JOIN endpoints AS n
    ON endpoint_wants(n.event_types, e.event_type)
   AND n.state IN ('ACTIVE', 'PAUSED')
 WHERE $1::bigint[] IS NULL OR e.aggregate_id = ANY ($1)
 ORDER BY e.id, n.endpoint_id
    ON CONFLICT (event_id, endpoint_id) DO NOTHING
"""


async def fan_out(conn: asyncpg.Connection, payment_ids: list[int] | None = None) -> int:
    """Write the missing deliveries of these payments' events (all events when None)."""
    result = await conn.execute(FAN_OUT_SQL, payment_ids)
    return int(result.split()[-1])


async def waiting_for_a_lock(conn: asyncpg.Connection, statement: str) -> bool:
    """Another session of this database waits for a lock in a statement starting so."""
    waiting = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        "   AND wait_event_type = 'Lock' AND ltrim(query, E' \\n') LIKE $1 || '%'",
        statement,
    )
    return bool(waiting)
