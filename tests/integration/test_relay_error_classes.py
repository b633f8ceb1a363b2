"""The relay tells a database outage from a bug: a loop whose database cannot be
reached logs a warning and waits; a loop whose query is wrong logs "relay loop crashed" with the
traceback. Both restart; only the words and the traceback differ, and they are what an operator
acts on."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from outbox_relay.main import Relay
from payment_service.config import load_settings
from payment_service.database import connect
from payment_service.embedded import free_port


async def supervise_once(dsn: str, query: str, *args: object) -> None:
    """Run one supervised relay loop that runs `query` on a fresh connection, then stops."""
    relay = Relay(
        load_settings(_env_file=None, database_url=dsn, relay_metrics_port=0, gateway="none")
    )

    async def loop() -> None:
        relay.stop()  # the supervisor logs this failure, then sees the stop and returns
        conn = await connect(dsn)
        try:
            await conn.fetchval(query, *args)
        finally:
            await conn.close()

    await relay._supervise("test", loop)


def records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(message)]


async def test_a_query_with_the_wrong_number_of_arguments_is_a_crash_with_a_traceback(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await supervise_once(database_url, "SELECT $1::int + $2::int", 1)

    (crash,) = records(caplog, "relay loop crashed")
    assert crash.levelno == logging.ERROR
    assert crash.exc_info is not None
    assert isinstance(crash.exc_info[1], asyncpg.InterfaceError)
    assert not records(caplog, "database unavailable")


async def test_a_refused_connection_is_waited_out_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    await supervise_once(f"postgresql://postgres@127.0.0.1:{free_port()}/payments", "SELECT 1")

    (warning,) = records(caplog, "database unavailable")
    assert warning.levelno == logging.WARNING
    assert warning.exc_info is None
    assert not records(caplog, "relay loop crashed")
