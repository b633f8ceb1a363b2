"""Fixtures for the migration tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from payment_service.migrations import load_migrations, migrate


@pytest.fixture
async def empty_db(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a fresh database with no schema at all."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def migrated_before(url: str, version: int) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the empty database at `url`, migrated up to (not including) `version`:
    the schema a migration's upgrade test starts from."""
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, [m for m in load_migrations() if m.version < version])
        yield conn
    finally:
        await conn.close()
