"""A plain-SQL migration runner: `db/migrations/NNNN_description.sql`, applied in order.

It runs under a session advisory lock, so many replicas may start it at once; each file is applied
in its own transaction together with its row in `schema_migrations`. A database that has a version
this code does not know is refused, and so is an applied file whose text has since changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

logger = logging.getLogger(__name__)

# pg_advisory_lock key shared by every migrating process ("paymigr" in ASCII).
MIGRATION_LOCK_ID = 0x7061796D696772
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


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
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
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
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    """
                    INSERT INTO schema_migrations (version, name, checksum)
                    VALUES ($1, $2, $3)
                    """,
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            done.append(migration.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


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
