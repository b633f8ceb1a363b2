"""`payment-service migrate` as real processes: applies the schema, reruns as a no-op,
is safe from many replicas at once, and refuses a database that is ahead of the code."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from payment_service.migrations import load_migrations
from tests.support.commands import run_to_end, service_command
from tests.support.environment import clean_env

LATEST = [m.version for m in load_migrations()]


async def versions(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [row["version"] for row in rows]
    finally:
        await conn.close()


async def test_migrate_then_rerun(tmp_path: Path, empty_database_url: str) -> None:
    env = clean_env(DATABASE_URL=empty_database_url)
    first = await asyncio.to_thread(run_to_end, ["migrate"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    assert await versions(empty_database_url) == LATEST

    again = await asyncio.to_thread(run_to_end, ["migrate"], env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
    assert await versions(empty_database_url) == LATEST


async def test_concurrent_migrate_processes(tmp_path: Path, empty_database_url: str) -> None:
    env = clean_env(DATABASE_URL=empty_database_url)
    processes = [
        await asyncio.create_subprocess_exec(
            *service_command("migrate"),
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in processes)), 120)
    for process, (_, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr.decode()
    outputs = [stdout.decode() for stdout, _ in results]
    assert sum("applied" in out for out in outputs) == 1, outputs
    assert await versions(empty_database_url) == LATEST


async def test_migrate_refuses_a_newer_database(tmp_path: Path, database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'future', $1)",
            "0" * 64,
        )
    finally:
        await conn.close()

    result = await asyncio.to_thread(run_to_end, ["migrate"], clean_env(DATABASE_URL=database_url),
                                     tmp_path)  # fmt: skip

    assert result.returncode != 0
    assert "9999" in result.stderr
    assert "Traceback" not in result.stderr, "an operator gets one clear line, not a traceback"
    assert await versions(database_url) == [*LATEST, 9999]


async def test_migrate_waits_then_fails_clearly_without_a_server(tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL="postgresql://postgres@127.0.0.1:1/nowhere")
    result = await asyncio.to_thread(run_to_end, ["migrate", "--wait", "1"], env, tmp_path, 60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert result.error_lines, "says why it failed"
