"""A plain-SQL migration runner: `db/migrations/NNNN_description.sql`, applied in order.

It runs under a session advisory lock, so many replicas may start it at once; each file is applied
in its own transaction together with its row in `schema_migrations`. A database that has a version
this code does not know is refused, and so is an applied file whose text has since changed.

A file whose first line is `-- migrate: no-transaction` runs outside any transaction instead, for
statements PostgreSQL refuses inside one (`CREATE INDEX CONCURRENTLY`): its statements are sent one
at a time, each committing on its own, and its row is recorded after the last. Such a file may stop
half-way and then runs again from its first statement, so every statement in it must be idempotent
(`IF NOT EXISTS`; note that a failed `CREATE INDEX CONCURRENTLY` leaves an INVALID index behind,
which `IF NOT EXISTS` would keep: put `DROP INDEX CONCURRENTLY IF EXISTS` before it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from payment_service.database import advisory_unlock, try_advisory_lock
from payment_service.sql import Statement

logger = logging.getLogger(__name__)

# pg_advisory_lock key shared by every migrating process ("paymigr" in ASCII).
MIGRATION_LOCK_ID = 0x7061796D696772
# How long a run waits between tries for that lock (seconds), doubling up to the maximum.
LOCK_RETRY_SECONDS = 0.05
LOCK_RETRY_MAX_SECONDS = 1.0
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
NO_TRANSACTION_MARKER = "-- migrate: no-transaction"
# What ends a statement, or starts a span in which `;` does not: quoted text, comments.
_SQL_TOKEN = re.compile(
    r"""(?P<semicolon>;)
      | (?P<escape>[eE]'(?:[^'\\]|\\.|'')*'?)
      | (?P<quoted>'(?:[^']|'')*'?|"(?:[^"]|"")*"?)
      | (?P<line_comment>--[^\n]*)
      | (?P<block_comment>/\*)
      | (?P<dollar>\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$)""",
    re.VERBOSE | re.DOTALL,
)


class MigrationError(Exception):
    """The database and the migrations of this code disagree."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        first_line = self.sql.lstrip("\ufeff").split("\n", 1)[0]
        return first_line.strip().lower() != NO_TRANSACTION_MARKER


def split_statements(sql: str) -> list[str]:
    """The statements of a SQL script, split on the semicolons outside quotes and comments.

    Knows PostgreSQL's lexical forms that may contain a `;`: '…' and E'…' strings, "…" identifiers,
    $tag$…$tag$ bodies, -- and (nested) /* */ comments. What follows the last `;` is a statement
    too unless it is blank (PostgreSQL accepts a statement that is only a comment).
    """
    statements: list[str] = []
    start = pos = 0
    while match := _SQL_TOKEN.search(sql, pos):
        pos = match.end()
        if match["semicolon"]:
            statements.append(sql[start:pos])
            start = pos
        elif match["block_comment"]:
            depth = 1
            while depth and pos < len(sql):
                if sql.startswith("/*", pos):
                    depth, pos = depth + 1, pos + 2
                elif sql.startswith("*/", pos):
                    depth, pos = depth - 1, pos + 2
                else:
                    pos += 1
        elif tag := match["dollar"]:
            end = sql.find(tag, pos)
            pos = len(sql) if end < 0 else end + len(tag)
    statements.append(sql[start:])
    return [s.strip() for s in statements if s.strip()]


def migrations_dir() -> Path:
    """`MIGRATIONS_DIR`, else `db/migrations` of a source checkout, else the copy in the wheel."""
    if configured := os.environ.get("MIGRATIONS_DIR"):
        return Path(configured)
    checkout = Path(__file__).resolve().parent.parent / "db" / "migrations"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parent / "sql_migrations"


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_description.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version in {directory}")
    if not found:
        raise MigrationError(f"no migrations found in {directory}")
    return found


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply every pending migration; return the versions applied (empty when up to date)."""
    migrations = migrations if migrations is not None else load_migrations()
    known = {m.version: m for m in migrations}
    await _lock(conn)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    int         PRIMARY KEY,
                name       text        NOT NULL,
                checksum   char(64)    NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        ahead = sorted(set(applied) - set(known))
        if ahead:
            raise MigrationError(
                f"the database has migration(s) {ahead} that this code does not know: "
                "it is newer than the code; deploy the newer code instead"
            )
        for version, checksum in applied.items():
            if known[version].checksum != checksum:
                raise MigrationError(
                    f"migration {version:04d}_{known[version].name}.sql changed after it was "
                    "applied; add a new migration instead of editing an applied one"
                )
        done: list[int] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            logger.info(
                "applying migration",
                extra={"version": migration.version, "migration": migration.name},
            )
            if migration.transactional:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await _record(conn, migration)
            else:
                # Each statement on its own: a multi-statement string would run in one implicit
                # transaction, which CREATE INDEX CONCURRENTLY refuses.
                for statement in split_statements(migration.sql):
                    await conn.execute(statement)
                await _record(conn, migration)
            done.append(migration.version)
        return done
    finally:
        await advisory_unlock(conn, MIGRATION_LOCK_ID)


async def _lock(conn: asyncpg.Connection) -> None:
    """Take the migration lock by retrying, not by blocking in `pg_advisory_lock`.

    A statement blocked in `pg_advisory_lock` holds a snapshot, and CREATE INDEX CONCURRENTLY in
    the lock holder waits for every older snapshot to end: the two would deadlock.
    """
    delay = LOCK_RETRY_SECONDS
    while not await try_advisory_lock(conn, MIGRATION_LOCK_ID):
        await asyncio.sleep(delay)
        delay = min(delay * 2, LOCK_RETRY_MAX_SECONDS)


RECORD = Statement(
    """
    INSERT INTO schema_migrations (version, name, checksum)
    VALUES (:version, :name, :checksum)
    """
)


async def _record(conn: asyncpg.Connection, migration: Migration) -> None:
    values = RECORD.args(
        version=migration.version, name=migration.name, checksum=migration.checksum
    )
    await conn.execute(RECORD.sql, *values)


async def pending_check(conn: asyncpg.Connection) -> None:
    """Refuse to serve a database that lacks this code's migrations.

    A database *ahead* of the code is served with a warning: in a rolling deploy the new release's
    migration runs before the old replicas are replaced, and migrations here only add (expand
    first, contract in a later release). `migrate` itself still refuses such a database.
    """
    migrations = load_migrations()
    try:
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    except asyncpg.UndefinedTableError:
        applied = set()
    known = {m.version for m in migrations}
    if known - applied:
        raise MigrationError(
            f"the database lacks migration(s) {sorted(known - applied)}: "
            "run 'payment-service migrate' first"
        )
    if applied - known:
        logger.warning(
            "the database schema is ahead of this code; serving (rolling deploy?)",
            extra={"unknown_versions": sorted(applied - known)},
        )
