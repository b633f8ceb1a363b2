"""Test databases: one real PostgreSQL per session, a migrated template, one clone per test.

The server comes from, in this order:
1. `TEST_DATABASE_URL` (any PostgreSQL whose user may CREATE DATABASE);
2. testcontainers' `PostgresContainer` when a Docker engine answers (image `TEST_POSTGRES_IMAGE`,
   default `postgres:16-alpine`, reached on 127.0.0.1);
3. the embedded PostgreSQL of the `pgserver` package otherwise.
Set `TEST_DATABASE_PROVIDER` to `url`, `docker` or `embedded` to insist on one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from payment_service.migrations import migrate


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


def _start_container() -> tuple[str, object]:
    # Read by testcontainers at import. Reach the published port on 127.0.0.1 directly, even where
    # /.dockerenv exists (as on some CI machines), which would make it go through 172.17.0.1.
    os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.14
        from testcontainers.postgres import PostgresContainer  # type: ignore[no-redef]

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
            f"[test database] provider=testcontainers image={container.image} "  # type: ignore[attr-defined]
            f"container={container.get_wrapped_container().short_id} dsn-host=127.0.0.1"
        )  # type: ignore[attr-defined]
        try:
            yield PostgresServer("testcontainers", dsn)
        finally:
            container.stop()  # type: ignore[attr-defined]
        return
    from payment_service.embedded import EmbeddedPostgres

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


_announcements: list[str] = []


def _announce(line: str) -> None:
    """Say which server serves the tests: now (shown with -s) and in pytest's closing summary."""
    print(f"\n{line}")
    _announcements.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _announcements:
        terminalreporter.write_line(line)


def pytest_report_header(config: pytest.Config) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    wanted = os.environ.get("TEST_DATABASE_PROVIDER", "auto")
    return f"test database provider: {wanted}{' (TEST_DATABASE_URL set)' if url else ''}"


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
