"""asyncpg's pool warns, with a traceback, each time it fails to reconnect its minimum of
connections: every second in every process while the database is away. When the cause is the
database being unavailable that warning is dropped (the service logs the loss once); any other
cause is kept."""

from __future__ import annotations

import logging
import sys

import pytest

from payment_service.database import DatabaseUnreachable, _pool_floor_noise


def _record(error: BaseException | None) -> logging.LogRecord:
    exc_info = None
    if error is not None:
        try:
            raise error
        except BaseException:
            exc_info = sys.exc_info()
    return logging.LogRecord(
        "asyncpg.pool",
        logging.WARNING,
        __file__,
        1,
        "Failed to restore the pool connection floor; retrying",
        None,
        exc_info,
    )


def _passes(record: logging.LogRecord) -> bool:
    return bool(logging.getLogger("asyncpg.pool").filter(record))


@pytest.mark.parametrize(
    "error", [DatabaseUnreachable("refused"), ConnectionResetError(), TimeoutError()]
)
def test_the_pools_reconnect_warning_is_dropped_while_the_database_is_away(
    error: BaseException,
) -> None:
    assert _pool_floor_noise in logging.getLogger("asyncpg.pool").filters
    assert not _passes(_record(error))


@pytest.mark.parametrize("error", [ValueError("a bug in init"), None])
def test_other_pool_warnings_are_kept(error: BaseException | None) -> None:
    assert _passes(_record(error))
