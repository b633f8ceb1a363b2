"""Migrations marked `-- migrate: no-transaction` (CREATE INDEX CONCURRENTLY): they run statement
by statement outside a transaction, under the same lock, are recorded after their last statement
and run again from the start after failing half-way; unmarked files still roll back as a unit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from payment_service.migrations import NO_TRANSACTION_MARKER, load_migrations, migrate

TABLE = "CREATE TABLE rides (id bigint PRIMARY KEY, city text NOT NULL, fare numeric(12, 2));\n"
INDEXES = f"""{NO_TRANSACTION_MARKER}
-- Two indexes; the semicolon in this comment; and the one in the string below do not split.
CREATE INDEX CONCURRENTLY IF NOT EXISTS rides_city ON rides (city);
CREATE INDEX CONCURRENTLY IF NOT EXISTS rides_big_fares ON rides (fare) WHERE city <> ';';
"""


def write(directory: Path, files: dict[str, str]) -> Path:
    for name, sql in files.items():
        (directory / name).write_text(sql, encoding="utf-8")
    return directory


async def valid_indexes(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'rides'::regclass AND i.indisvalid AND NOT i.indisprimary"
    )
    return {row["relname"] for row in rows}


async def applied_versions(conn: asyncpg.Connection) -> list[int]:
    rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return [row["version"] for row in rows]


async def test_create_index_concurrently_applies(
    empty_db: asyncpg.Connection, tmp_path: Path
) -> None:
    migrations = load_migrations(
        write(tmp_path, {"0001_rides.sql": TABLE, "0002_ride_indexes.sql": INDEXES})
    )
    assert [m.transactional for m in migrations] == [True, False]

    assert await migrate(empty_db, migrations) == [1, 2]

    assert await valid_indexes(empty_db) == {"rides_city", "rides_big_fares"}
    assert await migrate(empty_db, migrations) == []  # recorded: not run again


async def test_half_applied_file_runs_again_from_the_start(
    empty_db: asyncpg.Connection, tmp_path: Path
) -> None:
    write(tmp_path, {"0001_rides.sql": TABLE})
    failing = INDEXES + "SELECT fare FROM no_such_table;\n"
    write(tmp_path, {"0002_ride_indexes.sql": failing})

    with pytest.raises(asyncpg.UndefinedTableError):
        await migrate(empty_db, load_migrations(tmp_path))

    # The statements before the failure stay; the file is not recorded as applied.
    assert await valid_indexes(empty_db) == {"rides_city", "rides_big_fares"}
    assert await applied_versions(empty_db) == [1]
    # Fixed (an unrecorded file may change), it runs again from its first statement.
    await empty_db.execute("CREATE TABLE no_such_table (fare numeric(12, 2))")
    assert await asyncio.wait_for(migrate(empty_db, load_migrations(tmp_path)), 30) == [2]
    assert await applied_versions(empty_db) == [1, 2]


async def test_concurrent_runs_with_a_concurrent_index(
    empty_database_url: str, tmp_path: Path
) -> None:
    # CREATE INDEX CONCURRENTLY waits for every transaction holding an older snapshot, which
    # includes a statement waiting for the migration lock: the waiters must not hold one.
    migrations = load_migrations(
        write(tmp_path, {"0001_rides.sql": TABLE, "0002_ride_indexes.sql": INDEXES})
    )
    connections = [await asyncpg.connect(empty_database_url) for _ in range(4)]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(migrate(conn, migrations) for conn in connections)), 60
        )
        assert sorted(results, key=len) == [[], [], [], [1, 2]]
        assert await valid_indexes(connections[0]) == {"rides_city", "rides_big_fares"}
    finally:
        for conn in connections:
            await conn.close()


async def test_marker_only_counts_on_the_first_line(
    empty_db: asyncpg.Connection, tmp_path: Path
) -> None:
    broken = f"-- a normal migration\n{NO_TRANSACTION_MARKER}\n{TABLE}SELECT * FROM no_such_table;"
    migrations = load_migrations(write(tmp_path, {"0001_broken.sql": broken}))
    assert migrations[0].transactional

    with pytest.raises(asyncpg.UndefinedTableError):
        await migrate(empty_db, migrations)

    # One transaction: the table went with the failure.
    assert await empty_db.fetchval("SELECT to_regclass('rides')") is None
    assert await applied_versions(empty_db) == []
