"""Fixtures for the migration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest


@pytest.fixture
async def empty_db(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a fresh database with no schema at all."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        yield conn
    finally:
        await conn.close()
