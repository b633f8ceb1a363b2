"""The migration runner: empty database → latest, rerun is a no-op, concurrent runs
are safe, a database ahead of the code or with an edited applied migration is refused, and a failed
migration leaves nothing of itself behind."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from payment_service.migrations import (
    Migration,
    MigrationError,
    load_migrations,
    migrate,
    migrations_dir,
    pending_check,
)

TABLES = {"payments", "payment_refunds", "idempotency_keys", "outbox_events", "schema_migrations"}


async def tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in rows}


async def applied_versions(conn: asyncpg.Connection) -> list[int]:
    rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return [row["version"] for row in rows]


def test_migration_files_are_numbered_in_order() -> None:
    migrations = load_migrations()
    versions = [m.version for m in migrations]
    # Numbers are reserved per change, so a branch may lack one another branch adds: a gap is
    # fine, a duplicate or a missing 0001 is not.
    assert versions[0] == 1
    assert versions == sorted(set(versions)), "no duplicates, applied in order"
    for migration in migrations:
        assert (migrations_dir() / f"{migration.version:04d}_{migration.name}.sql").is_file()


async def test_empty_database_to_latest(empty_db: asyncpg.Connection) -> None:
    latest = [m.version for m in load_migrations()]

    applied = await migrate(empty_db)

    assert applied == latest
    assert await applied_versions(empty_db) == latest
    assert await tables(empty_db) >= TABLES
    checksums = {
        row["version"]: row["checksum"]
        for row in await empty_db.fetch("SELECT version, checksum FROM schema_migrations")
    }
    assert checksums == {m.version: m.checksum for m in load_migrations()}
    await pending_check(empty_db)  # the app accepts this database


async def test_rerun_is_a_no_op(empty_db: asyncpg.Connection) -> None:
    await migrate(empty_db)
    before = await empty_db.fetch("SELECT * FROM schema_migrations ORDER BY version")

    assert await migrate(empty_db) == []
    assert await migrate(empty_db) == []

    assert await empty_db.fetch("SELECT * FROM schema_migrations ORDER BY version") == before


@pytest.mark.parametrize("runs", [2, 6])
async def test_concurrent_runs_are_safe(empty_database_url: str, runs: int) -> None:
    latest = [m.version for m in load_migrations()]
    connections = [await asyncpg.connect(empty_database_url) for _ in range(runs)]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(migrate(conn) for conn in connections)), 60
        )
        # One run applies everything; the others wait for its lock and find nothing to do.
        assert sorted(results, key=len) == [[]] * (runs - 1) + [latest]
        assert await applied_versions(connections[0]) == latest
    finally:
        for conn in connections:
            await conn.close()


async def test_database_ahead_of_the_code_is_refused(empty_db: asyncpg.Connection) -> None:
    await migrate(empty_db)
    await empty_db.execute(
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', $1)",
        "0" * 64,
    )

    with pytest.raises(MigrationError, match="9999"):
        await migrate(empty_db)


async def test_serving_checks_refuse_a_schema_behind_and_warn_about_one_ahead(
    empty_db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(MigrationError, match="run 'payment-service migrate'"):
        await pending_check(empty_db)  # nothing applied yet: behind
    await migrate(empty_db)
    await pending_check(empty_db)  # up to date
    await empty_db.execute(
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', $1)",
        "0" * 64,
    )
    # Ahead (a rolling deploy's new migration already ran): served, with a warning.
    await pending_check(empty_db)
    assert any("ahead of this code" in r.getMessage() for r in caplog.records)


async def test_edited_applied_migration_is_refused(empty_db: asyncpg.Connection) -> None:
    migrations = load_migrations()
    await migrate(empty_db)
    edited = [replace(migrations[0], sql=migrations[0].sql + "\n-- edited after it was applied\n")]
    edited += migrations[1:]

    with pytest.raises(MigrationError, match=f"{migrations[0].version:04d}"):
        await migrate(empty_db, edited)
    assert await applied_versions(empty_db) == [m.version for m in migrations]


async def test_pending_check_refuses_a_database_behind_the_code(
    empty_db: asyncpg.Connection,
) -> None:
    with pytest.raises(MigrationError, match="migrate"):
        await pending_check(empty_db)
    migrations = load_migrations()
    await migrate(empty_db, migrations[:1])
    if len(migrations) > 1:
        with pytest.raises(MigrationError):
            await pending_check(empty_db)
        await migrate(empty_db)
    await pending_check(empty_db)


async def test_new_migration_is_applied_on_top(empty_db: asyncpg.Connection) -> None:
    migrations = load_migrations()
    await migrate(empty_db)
    extra = Migration(
        migrations[-1].version + 1, "add_note", "ALTER TABLE payments ADD COLUMN note text;"
    )

    assert await migrate(empty_db, [*migrations, extra]) == [extra.version]
    assert (
        await empty_db.fetchval(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'payments' AND column_name = 'note'"
        )
        == 1
    )


async def test_failed_migration_leaves_nothing_of_itself(empty_db: asyncpg.Connection) -> None:
    migrations = load_migrations()
    broken = Migration(
        migrations[-1].version + 1,
        "broken",
        "CREATE TABLE half_done (id int); SELECT * FROM no_such_table;",
    )

    with pytest.raises(asyncpg.PostgresError):
        await migrate(empty_db, [*migrations, broken])

    assert await applied_versions(empty_db) == [m.version for m in migrations]
    assert "half_done" not in await tables(empty_db)
    # The advisory lock was released: another run proceeds at once.
    assert await asyncio.wait_for(migrate(empty_db, migrations), 10) == []


def test_badly_named_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_good.sql").write_text("SELECT 1;")
    (tmp_path / "2_bad.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"2_bad\.sql"):
        load_migrations(tmp_path)


def test_duplicate_versions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_one.sql").write_text("SELECT 1;")
    (tmp_path / "0001_other.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError):
        load_migrations(tmp_path)


def test_empty_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MigrationError):
        load_migrations(tmp_path)
