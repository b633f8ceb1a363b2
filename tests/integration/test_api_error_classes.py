"""Errors are classified honestly: only a lost or refused database connection is a 503
DATABASE_UNAVAILABLE; a query that is wrong for the schema it meets is a 500 INTERNAL_ERROR whose
traceback is logged (and never sent)."""

from __future__ import annotations

import logging
import tempfile

import asyncpg
import httpx
import pytest

from app.context import PaymentApp
from tests.integration.conftest import ApiFactory
from tests.support.api import assert_problem, payment_body, post_json


def logged_tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.getMessage() == "unhandled error" and r.exc_info is not None
    ]


def add_buggy_route(app: PaymentApp) -> None:
    """A route with the kind of bug a refactoring leaves: a query given too few arguments."""

    @app.get("/test-only/too-few-arguments")
    async def too_few_arguments() -> dict[str, int]:
        async with app.connection() as conn:
            return {"n": await conn.fetchval("SELECT $1::int + $2::int", 1)}


async def test_a_query_with_the_wrong_number_of_arguments_is_a_logged_500(
    api_factory: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    api = await api_factory(customize=add_buggy_route)

    response = await api.client.get("/test-only/too-few-arguments")

    # asyncpg raises an InterfaceError for it, the family of its "connection is closed" errors:
    # still a bug in the code, not an outage, so no 503 and no Retry-After.
    assert_problem(response, 500, "INTERNAL_ERROR")
    assert "retry-after" not in response.headers
    (record,) = logged_tracebacks(caplog)
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], asyncpg.InterfaceError)
    assert "expects 2 arguments" in str(record.exc_info[1])
    assert not [r for r in caplog.records if r.getMessage() == "database unavailable"]


async def test_a_query_failing_in_the_database_is_a_logged_500(
    client: httpx.AsyncClient, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    # payment_json now fails with a data exception (SQLSTATE class 22) for every payment.
    await db.execute(
        """
        CREATE OR REPLACE FUNCTION payment_json(p payments) RETURNS jsonb
        LANGUAGE sql STABLE AS $$ SELECT to_jsonb(p.amount / 0) $$
        """
    )

    response = await post_json(client, "/payments", payment_body())

    assert_problem(response, 500, "INTERNAL_ERROR")
    (record,) = logged_tracebacks(caplog)
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], asyncpg.DataError)


async def test_a_database_that_cannot_be_connected_to_is_a_503(
    api_factory: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # No server socket in an empty directory: connecting fails with FileNotFoundError, an
    # OSError that is neither a ConnectionError nor a timeout; it still means "unreachable".
    with tempfile.TemporaryDirectory(prefix="payments-no-socket-") as empty:
        api = await api_factory(database_url=f"postgresql://postgres@/payments?host={empty}")

        response = await post_json(api.client, "/payments", payment_body())

    assert_problem(response, 503, "DATABASE_UNAVAILABLE")
    assert response.headers["retry-after"]
    assert not logged_tracebacks(caplog)
