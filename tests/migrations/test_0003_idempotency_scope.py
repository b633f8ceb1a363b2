"""Migration 0003 (idempotency keys scoped per caller) on a database that holds data: the rows of
the previous version become the caller `default`, which today's settings (auth off, bare tokens)
map to, so a client retrying across the upgrade still gets its replay; the guide's query by
key_hash still finds the row; and the migration gives up instead of queueing behind a long
transaction."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from app.idempotency import fingerprint
from app.models import CreatePayment
from payment_cli.check import check_database
from payment_service.migrations import load_migrations, migrate
from tests.support.api import assert_replay, exact_json, post_json, running_api

SCOPE_VERSION = 3
GUIDE_BODY: dict[str, Any] = {
    "idempotency_key": "demo-client-1",
    "trip_id": 101,
    "method": "CARD",
    "amount": Decimal("150.00"),
}
GUIDE_QUERY = (
    "SELECT caller, response_data ->> 'payment_id' AS payment_id FROM idempotency_keys "
    "WHERE key_hash = encode(digest('demo-client-1','sha256'),'hex')"
)


@pytest.fixture
async def before_scope(empty_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A database at the version before 0003 holding the guide's payment, as that version wrote
    it: payment, outbox event and the key's row with its answer, in one transaction."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        await migrate(conn, [m for m in load_migrations() if m.version < SCOPE_VERSION])
        model = CreatePayment.model_validate(GUIDE_BODY).model_copy(update={"currency": "INR"})
        request = model.model_dump(mode="json", exclude={"idempotency_key"}, exclude_none=True)
        await conn.execute(
            """
            WITH payment AS (
                INSERT INTO payments (trip_id, amount, currency, method, status, reference,
                                      idempotency_hash)
                VALUES (101, 150.00, 'INR', 'CARD', 'SUCCESS', 'PAY-20260101-0000abcd',
                        encode(digest('demo-client-1','sha256'),'hex'))
             RETURNING payments
            ), event AS (
                INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
                SELECT e.id, 'payment.succeeded', (p.payments).payment_id,
                       payment_event_json(p.payments, e.id, 'payment.succeeded')
                  FROM payment AS p, (SELECT gen_random_uuid() AS id) AS e
            )
            INSERT INTO idempotency_keys (key_hash, request_path, request_fingerprint,
                                          response_status, response_data, expires_at)
            SELECT encode(digest('demo-client-1','sha256'),'hex'), 'POST:/payments', $1, 200,
                   payment_json(p.payments), now() + interval '1 day'
              FROM payment AS p
            """,
            fingerprint("POST", "/payments", {}, request),
        )
        yield conn
    finally:
        await conn.close()


async def test_existing_rows_become_the_default_caller(
    before_scope: asyncpg.Connection, empty_database_url: str
) -> None:
    stored = await before_scope.fetchval("SELECT response_data::text FROM idempotency_keys")

    assert (
        await migrate(before_scope) == [m.version for m in load_migrations()][SCOPE_VERSION - 1 :]
    )

    rows = await before_scope.fetch(GUIDE_QUERY)
    assert [row["caller"] for row in rows] == ["default"], "the guide's query finds the row"
    assert await before_scope.fetchval("SELECT response_data::text FROM idempotency_keys") == stored
    assert await before_scope.fetchval("SELECT caller FROM payments") == "default"
    report = await check_database(
        before_scope, idempotency_key_ttl=86400, outbox_retention_hours=168
    )
    assert report.consistent, [check for check in report.checks if not check.ok]

    # A client retrying across the upgrade is replayed its answer: auth off, and a bare token.
    for settings in ({"api_keys": ()}, {"api_keys": ("tok",)}):
        async with running_api(empty_database_url, **settings) as api:
            auth = {"Authorization": "Bearer tok"} if settings["api_keys"] else {}
            again = await post_json(api.client, "/payments", GUIDE_BODY, headers=auth)
            assert again.status_code == 200, again.text
            assert again.headers.get("idempotent-replayed") == "true"
            assert json.loads(again.text) == json.loads(stored)
    # A named caller's key is its own: not the replay, its own answer (the trip is charged).
    async with running_api(empty_database_url, api_keys=("svc-a:tok-a",)) as api:
        first = await post_json(
            api.client, "/payments", GUIDE_BODY, headers={"Authorization": "Bearer tok-a"}
        )
        assert first.status_code == 409, first.text
        assert exact_json(first)["code"] == "TRIP_ALREADY_CHARGED"
        assert first.headers.get("idempotent-replayed") is None
        assert_replay(
            first,
            await post_json(
                api.client, "/payments", GUIDE_BODY, headers={"Authorization": "Bearer tok-a"}
            ),
        )
    assert sorted(row["caller"] for row in await before_scope.fetch(GUIDE_QUERY)) == [
        "default",
        "svc-a",
    ]


async def test_one_row_per_caller_and_key(before_scope: asyncpg.Connection) -> None:
    await migrate(before_scope)
    insert = """
        INSERT INTO idempotency_keys (key_hash, caller, request_path, request_fingerprint,
                                      response_status, response_data, expires_at)
        SELECT key_hash, $1, request_path, request_fingerprint, response_status, response_data,
               expires_at
          FROM idempotency_keys
         WHERE caller = 'default'
    """
    await before_scope.execute(insert, "svc-a")
    with pytest.raises(asyncpg.UniqueViolationError):
        await before_scope.execute(insert, "svc-a")
    primary_key = await before_scope.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conname = 'idempotency_keys_pkey'"
    )
    assert primary_key == "PRIMARY KEY (key_hash, caller)"


async def test_behind_a_long_transaction_it_gives_up_and_runs_again_later(
    before_scope: asyncpg.Connection, empty_database_url: str
) -> None:
    """It does not queue for its ACCESS EXCLUSIVE locks (every request of the API would queue
    behind it): it fails after lock_timeout, leaves nothing, and runs once the reader is done."""
    reader = await asyncpg.connect(empty_database_url)
    try:
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM payments")  # holds ACCESS SHARE
            with pytest.raises(asyncpg.LockNotAvailableError):
                await migrate(before_scope)
        columns = await before_scope.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'caller'"
        )
        assert columns == 0
        assert await before_scope.fetchval("SELECT max(version) FROM schema_migrations") == 2
    finally:
        await reader.close()
    assert SCOPE_VERSION in await migrate(before_scope)
