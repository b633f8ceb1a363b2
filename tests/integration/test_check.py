"""`payment-service check` against a database written by the real API, then corrupted by SQL.

One database per module is filled through the API (served in-process by Hypercorn): a charge, a
partial refund, two refunds that add up to the amount, an asynchronous payment still pending, one
settled SUCCESS and one settled FAILED. Each test clones it, injects one kind of corruption and
asserts that exactly the checks that should fail do, naming the corrupted row.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from payment_cli.check import CHECKS, Report, check_database
from payment_service import endpoints
from payment_service.embedded import free_port
from tests.support.api import ADMIN_AUTH, ADMIN_KEYS, new_key, new_trip, post_json, running_api
from tests.support.audit import OPERATOR
from tests.support.commands import service_command
from tests.support.database import FAN_OUT_SQL, insert_events
from tests.support.environment import clean_env

TTL_SECONDS = 86400
RETENTION_HOURS = 168.0


# -- the consistent database -----------------------------------------------------------------------
@contextlib.asynccontextmanager
async def cloned_database(server: Any, template: str, prefix: str) -> AsyncIterator[str]:
    """A new database copied from `template`, dropped afterwards; its name."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(server.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        yield name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="module")
async def written_by_api(
    postgres_server: Any, template_database: str
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(database name, ids): a migrated database that the real API filled, used as a template."""
    async with cloned_database(postgres_server, template_database, "check_source") as name:
        yield name, await _fill_through_api(postgres_server.dsn(name))


async def _fill_through_api(dsn: str) -> dict[str, Any]:
    ids: dict[str, Any] = {"keys": {}}

    async def post(path: str, body: dict[str, Any], expected: int) -> dict[str, Any]:
        key = new_key("check")
        admin = ADMIN_AUTH if path.startswith("/admin/") else {}
        response = await post_json(api.client, path, {"idempotency_key": key, **body}, admin)
        assert response.status_code == expected, response.text
        document: dict[str, Any] = response.json()
        ids["keys"][key] = document
        return document

    async def pay(name: str, method: str, amount: str) -> int:
        body = {"trip_id": new_trip(), "method": method, "amount": amount}
        document = await post("/payments", body, 202 if method == "UPI" else 200)
        ids[name] = document["payment_id"]
        return int(document["payment_id"])

    # UPI settles asynchronously there, settled by an operator (the admin API).
    async with running_api(dsn, admin_api_keys=ADMIN_KEYS) as api:
        await pay("charged", "CARD", "100.00")
        partial = await pay("partial", "CARD", "100.00")
        refund = await post(f"/payments/{partial}/refunds", {"amount": "30.00"}, 200)
        ids["partial_refund"] = refund["refund_id"]
        full = await pay("refunded", "CARD", "90.00")
        first = await post(f"/payments/{full}/refunds", {"amount": "40.00"}, 200)
        rest = await post(f"/payments/{full}/refunds", {}, 200)
        assert rest["payment_status"] == "REFUNDED", rest
        ids["full_refunds"] = [first["refund_id"], rest["refund_id"]]
        await pay("pending", "UPI", "10.00")
        settled = await pay("settled", "UPI", "20.00")
        await post(f"/admin/payments/{settled}/settlement", {"status": "SUCCESS"}, 200)
        failed = await pay("failed", "UPI", "30.00")
        await post(f"/admin/payments/{failed}/settlement", {"status": "FAILED"}, 200)
    return ids


@pytest.fixture
async def ids(written_by_api: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return written_by_api[1]


@pytest.fixture
async def check_dsn(
    postgres_server: Any, written_by_api: tuple[str, dict[str, Any]]
) -> AsyncIterator[str]:
    """A fresh copy of the API-written database."""
    async with cloned_database(postgres_server, written_by_api[0], "check_copy") as name:
        yield postgres_server.dsn(name)


@pytest.fixture
async def check_db(check_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(check_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def run(
    conn: asyncpg.Connection, *, ttl: int = TTL_SECONDS, retention: float = RETENTION_HOURS
) -> Report:
    return await check_database(conn, idempotency_key_ttl=ttl, outbox_retention_hours=retention)


def failures(report: Report) -> dict[str, set[str]]:
    """check name -> ids of the rows it reported."""
    return {r.name: {e["id"] for e in r.examples} for r in report.checks if not r.ok}


# -- consistent data passes ----------------------------------------------------------------------
async def test_a_database_written_by_the_api_is_consistent(
    check_db: asyncpg.Connection, ids: dict[str, Any]
) -> None:
    report = await run(check_db)
    assert report.consistent, failures(report)
    assert [r.name for r in report.checks] == [c.name for c in CHECKS]
    assert report.summary["payments"] == 6
    assert report.summary["refunds"] == 3
    # 6 creations + 2 settlements + 3 refunds; 6 payments + 2 settlements + 3 refunds keys.
    assert report.summary["events"] == 11
    assert report.summary["idempotency_keys"] == 11


# -- each kind of corruption is caught by the check that owns it ----------------------------------
def _new_event_sql(event_type: str) -> str:
    """Insert an extra event of `event_type` for payment $1, its payload consistent with its row,
    and its deliveries."""
    return f"""
        INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
        SELECT e.id, '{event_type}', p.payment_id, payment_event_json(p, e.id, '{event_type}')
          FROM payments AS p, (SELECT gen_random_uuid() AS id) AS e
         WHERE p.payment_id = $1;
        {_FAN_OUT}
    """


# The deliveries of payment $1's events that the API's fan-out would have written.
_FAN_OUT = FAN_OUT_SQL.replace(
    "$1::bigint[] IS NULL OR e.aggregate_id = ANY ($1)", "e.aggregate_id = $1"
)


CORRUPTIONS: list[tuple[str, str, str, dict[str, str]]] = [
    # (case, SQL with $1 = the id named by the third field, that id's name, {check: subject})
    (
        "an event's delivery missing",
        "DELETE FROM deliveries WHERE aggregate_id = $1",
        "charged",
        {"event_deliveries": "event"},
    ),
    (
        "a delivery about another payment than its event",
        "UPDATE deliveries SET aggregate_id = aggregate_id + 1000 WHERE aggregate_id = $1",
        "charged",
        {"delivery_rows": "delivery"},
    ),
    (
        "a delivery DELIVERED without a time",
        "UPDATE deliveries SET status = 'DELIVERED', delivered_at = NULL WHERE aggregate_id = $1",
        "charged",
        {"delivery_rows": "delivery"},
    ),
    (
        "charge event missing",
        "DELETE FROM outbox_events WHERE aggregate_id = $1",
        "charged",
        {"payment_events": "charged"},
    ),
    (
        "charge event duplicated",
        _new_event_sql("payment.succeeded"),
        "charged",
        {"payment_events": "charged"},
    ),
    (
        "pending event missing",
        "DELETE FROM outbox_events WHERE aggregate_id = $1",
        "pending",
        {"payment_events": "pending"},
    ),
    (
        "failed event missing",
        "DELETE FROM outbox_events WHERE aggregate_id = $1 AND event_type = 'payment.failed'",
        "failed",
        {"payment_events": "failed"},
    ),
    (
        "settlement event for a payment still pending",
        _new_event_sql("payment.succeeded"),
        "pending",
        {"payment_events": "pending"},
    ),
    (
        "payment.succeeded for a failed payment",
        _new_event_sql("payment.succeeded"),
        "failed",
        {"payment_events": "failed"},
    ),
    (
        "refund event missing",
        "DELETE FROM outbox_events WHERE aggregate_id = $1 AND event_type = 'payment.refunded'",
        "partial",
        {"refund_events": "partial_refund"},
    ),
    (
        "refund event duplicated",
        """
        INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
        SELECT e.id, o.event_type, o.aggregate_id,
               o.payload || jsonb_build_object('event_id', e.id)
          FROM outbox_events AS o, (SELECT gen_random_uuid() AS id) AS e
         WHERE o.aggregate_id = $1 AND o.event_type = 'payment.refunded';
        """
        + _FAN_OUT,
        "partial",
        {"refund_events": "partial_refund"},
    ),
    (
        "refund event names no refund",
        """
        UPDATE outbox_events SET payload = jsonb_set(payload, '{refund_id}', '987654')
         WHERE aggregate_id = $1 AND event_type = 'payment.refunded'
        """,
        "partial",
        {"refund_events": "partial_refund"},
    ),
    (
        "refund event's refund_id is not a number",
        """
        UPDATE outbox_events SET payload = jsonb_set(payload, '{refund_id}', '"abc"')
         WHERE aggregate_id = $1 AND event_type = 'payment.refunded'
        """,
        "partial",
        {"refund_events": "partial_refund"},
    ),
    (
        "refund marked FAILED still counted and announced",
        "UPDATE payment_refunds SET status = 'FAILED' WHERE payment_id = $1",
        "partial",
        {"refund_sums": "partial", "refund_events": "partial_refund"},
    ),
    (
        "event payload about another payment",
        """
        UPDATE outbox_events SET payload = jsonb_set(payload, '{payment_id}', '987654')
         WHERE aggregate_id = $1
        """,
        "charged",
        {"event_payloads": "event"},
    ),
    (
        "event row and payload disagree on the type",
        """
        UPDATE outbox_events SET payload = jsonb_set(payload, '{event_type}', '"payment.failed"')
         WHERE aggregate_id = $1
        """,
        "charged",
        {"event_payloads": "event"},
    ),
    (
        "refund amount changed",
        "UPDATE payment_refunds SET amount = amount + 5 WHERE payment_id = $1",
        "partial",
        {"refund_sums": "partial"},
    ),
    (
        "refunds sum to more than the payment",
        """
        UPDATE payment_refunds SET amount = amount + 50
         WHERE refund_id = (SELECT min(refund_id) FROM payment_refunds WHERE payment_id = $1)
        """,
        "refunded",
        {"refund_sums": "refunded"},
    ),
    (
        "refunded payment says SUCCESS",
        """
        ALTER TABLE payments DROP CONSTRAINT payments_refund_status;
        UPDATE payments SET status = 'SUCCESS' WHERE payment_id = $1
        """,
        "refunded",
        {"refund_status": "refunded"},
    ),
    (
        "partially refunded payment says REFUNDED",
        """
        ALTER TABLE payments DROP CONSTRAINT payments_refund_status;
        UPDATE payments SET status = 'REFUNDED' WHERE payment_id = $1
        """,
        "partial",
        {"refund_status": "partial"},
    ),
    (
        "payment's idempotency record missing",
        """
        DELETE FROM idempotency_keys
         WHERE key_hash = (SELECT idempotency_hash FROM payments WHERE payment_id = $1)
        """,
        "charged",
        {"payment_idempotency": "charged"},
    ),
    (
        "payment's key claimed again before it expired",
        """
        UPDATE idempotency_keys SET created_at = created_at + interval '1 second'
         WHERE key_hash = (SELECT idempotency_hash FROM payments WHERE payment_id = $1)
        """,
        "charged",
        {"payment_idempotency": "charged"},
    ),
    (
        "payment's idempotency record answers another payment",
        """
        UPDATE idempotency_keys
           SET response_data = jsonb_set(response_data, '{payment_id}', '987654')
         WHERE key_hash = (SELECT idempotency_hash FROM payments WHERE payment_id = $1)
        """,
        "charged",
        {"payment_idempotency": "charged", "orphan_idempotency": "key"},
    ),
    (
        "refund's idempotency record missing",
        """
        DELETE FROM idempotency_keys
         WHERE key_hash IN (SELECT idempotency_hash FROM payment_refunds WHERE payment_id = $1)
        """,
        "partial",
        {"refund_idempotency": "partial_refund"},
    ),
    (
        "a stored answer names a payment that does not exist",
        """
        INSERT INTO idempotency_keys
               (key_hash, request_path, request_fingerprint, response_status, response_data,
                expires_at)
        VALUES (encode(sha256('orphan'::bytea), 'hex'), 'POST:/payments', repeat('0', 64), 200,
                jsonb_build_object('payment_id', $1::bigint + 1000), now() + interval '1 day')
        """,
        "charged",
        {"orphan_idempotency": "key"},
    ),
    (
        "a stored answer's payment_id is not a number",
        """
        INSERT INTO idempotency_keys
               (key_hash, request_path, request_fingerprint, response_status, response_data,
                expires_at)
        VALUES (encode(sha256('garbled'::bytea), 'hex'), 'POST:/payments', repeat('0', 64), 200,
                jsonb_build_object('payment_id', 'x' || $1::bigint), now() + interval '1 day')
        """,
        "charged",
        {"orphan_idempotency": "key"},
    ),
    (
        "a stored answer names a refund made with another key",
        """
        INSERT INTO idempotency_keys
               (key_hash, request_path, request_fingerprint, response_status, response_data,
                expires_at)
        SELECT encode(sha256('stolen'::bytea), 'hex'), 'POST:/payments/{payment_id}/refunds',
               repeat('0', 64), 200, jsonb_build_object('refund_id', r.refund_id),
               now() + interval '1 day'
          FROM payment_refunds AS r WHERE r.payment_id = $1
        """,
        "partial",
        {"orphan_idempotency": "key"},
    ),
]


@pytest.mark.parametrize(
    ("sql", "target", "expected"),
    [pytest.param(sql, target, expected, id=case) for case, sql, target, expected in CORRUPTIONS],
)
async def test_each_corruption_fails_exactly_its_checks(
    check_db: asyncpg.Connection,
    ids: dict[str, Any],
    sql: str,
    target: str,
    expected: dict[str, str],
) -> None:
    await _inject(check_db, sql, ids[target])
    report = await run(check_db)
    found = failures(report)
    assert not report.consistent
    assert set(found) == set(expected), found
    for check, subject in expected.items():
        if subject in ("event", "key", "delivery"):
            continue  # ids the test does not know in advance; the count below suffices
        wanted = ids[subject]
        wanted_ids = {str(w) for w in wanted} if isinstance(wanted, list) else {str(wanted)}
        assert found[check] & wanted_ids, (check, found[check], wanted_ids)
    for result in report.checks:
        if not result.ok:
            assert result.violations >= 1 and result.examples and result.examples[0]["detail"]


async def _inject(conn: asyncpg.Connection, sql: str, target: int) -> None:
    statements = [part for part in sql.split(";\n") if part.strip()]
    for statement in statements:
        if "$1" in statement:
            await conn.execute(statement, target)
        else:
            await conn.execute(statement)


async def test_orphan_rows_are_reported(check_db: asyncpg.Connection, ids: dict[str, Any]) -> None:
    """An event, its delivery and a refund of a payment that does not exist (foreign keys
    bypassed)."""
    await check_db.execute("SET session_replication_role = replica")  # skips the FK triggers
    await check_db.execute(
        """
        INSERT INTO outbox_events (event_type, aggregate_id, payload)
        VALUES ('payment.succeeded', 987654, '{}');
        UPDATE outbox_events
           SET payload = jsonb_build_object('event_id', event_id, 'event_type', event_type,
                                            'payment_id', aggregate_id)
         WHERE aggregate_id = 987654;
        INSERT INTO payment_refunds (payment_id, amount, idempotency_hash)
        VALUES (987654, 1.00, repeat('a', 64));
        """
    )
    await check_db.execute(FAN_OUT_SQL, [987654])
    found = failures(await run(check_db))
    assert set(found) == {
        "delivery_rows",
        "event_payloads",
        "orphan_refunds",
        "refund_events",
        "refund_idempotency",
    }, found
    orphan_refund = await check_db.fetchval(
        "SELECT refund_id FROM payment_refunds WHERE payment_id = 987654"
    )
    assert found["orphan_refunds"] == {str(orphan_refund)}
    orphan_event = await check_db.fetchval(
        "SELECT id FROM outbox_events WHERE aggregate_id = 987654"
    )
    assert found["event_payloads"] == {str(orphan_event)}


# -- the windows in which rows may legitimately be gone -------------------------------------------
PAYMENT_KEY = "key_hash = (SELECT idempotency_hash FROM payments WHERE payment_id = $1)"


async def _age_payment(conn: asyncpg.Connection, payment_id: int, age: str) -> None:
    await conn.execute(
        "UPDATE payments SET created_at = created_at - $2::text::interval, "
        "updated_at = updated_at - $2::text::interval WHERE payment_id = $1",
        payment_id,
        age,
    )


async def test_an_expired_and_purged_key_is_not_an_inconsistency(
    check_db: asyncpg.Connection, ids: dict[str, Any]
) -> None:
    """A payment older than the TTL may have lost its key row; a younger one may not."""
    charged = ids["charged"]
    await _age_payment(check_db, charged, "25 hours")
    await check_db.execute(f"DELETE FROM idempotency_keys WHERE {PAYMENT_KEY}", charged)
    assert (await run(check_db, ttl=86400)).consistent
    # Checked with a TTL longer than the payment's age, the missing row is a violation.
    found = failures(await run(check_db, ttl=2 * 86400))
    assert found == {"payment_idempotency": {str(charged)}}, found


async def test_an_expired_key_claimed_again_is_not_an_inconsistency(
    check_db: asyncpg.Connection, ids: dict[str, Any]
) -> None:
    """After expiry a key counts as new: its row then describes the new claim, not the payment."""
    charged = ids["charged"]
    await _age_payment(check_db, charged, "25 hours")
    await check_db.execute(
        "UPDATE idempotency_keys SET created_at = now(), expires_at = now() + interval '1 day' "
        f"WHERE {PAYMENT_KEY}",
        charged,
    )
    assert (await run(check_db, ttl=86400)).consistent


async def test_two_callers_using_one_key_are_consistent(
    database_url: str, db: asyncpg.Connection
) -> None:
    """Keys are scoped per caller: each caller's payment and refund relate to its own key row,
    and a row credited to the wrong caller is reported."""
    key, refund_key = new_key("shared"), new_key("shared-refund")
    payments = []
    async with running_api(database_url, api_keys=("svc-a:tok-a", "svc-b:tok-b")) as api:
        for token in ("tok-a", "tok-b"):
            auth = {"Authorization": f"Bearer {token}"}
            body = {"idempotency_key": key, "trip_id": new_trip(), "method": "CARD", "amount": "9"}
            payment = await post_json(api.client, "/payments", body, headers=auth)
            assert payment.status_code == 200, payment.text
            payments.append(payment.json()["payment_id"])
            path = f"/payments/{payments[-1]}/refunds"
            refund = await post_json(
                api.client, path, {"idempotency_key": refund_key, "amount": "1"}, headers=auth
            )
            assert refund.status_code == 200, refund.text

    report = await run(db)
    assert report.consistent, failures(report)
    assert report.summary["idempotency_keys"] == 4

    await db.execute("UPDATE payments SET caller = 'svc-b' WHERE payment_id = $1", payments[0])
    found = failures(await run(db))
    assert found == {"payment_idempotency": {str(payments[0])}}, found


async def test_events_past_retention_may_be_gone(
    check_db: asyncpg.Connection, ids: dict[str, Any]
) -> None:
    """Delivered events are deleted after OUTBOX_RETENTION_HOURS: only younger ones are required."""
    refunded = ids["refunded"]
    await _age_payment(check_db, refunded, "8 days")
    await check_db.execute(
        "UPDATE payment_refunds SET created_at = created_at - interval '8 days' "
        "WHERE payment_id = $1",
        refunded,
    )
    await check_db.execute("DELETE FROM outbox_events WHERE aggregate_id = $1", refunded)
    # The key rows are older than the TTL too (aged with their payment): checked with TTL 1 s.
    assert (await run(check_db, ttl=1, retention=168)).consistent
    found = failures(await run(check_db, ttl=1, retention=240))
    assert found == {
        "payment_events": {str(refunded)},
        "refund_events": {str(r) for r in ids["full_refunds"]},
    }, found
    # No retention at all: delivered events may vanish at once, so none is required.
    await check_db.execute("DELETE FROM outbox_events WHERE aggregate_id = $1", ids["charged"])
    assert (await run(check_db, retention=0)).consistent


async def test_a_duplicate_is_reported_at_any_age(
    check_db: asyncpg.Connection, ids: dict[str, Any]
) -> None:
    charged = ids["charged"]
    await _age_payment(check_db, charged, "30 days")
    await _inject(check_db, _new_event_sql("payment.succeeded"), charged)
    found = failures(await run(check_db, ttl=1))
    assert found == {"payment_events": {str(charged)}}, found


# -- the command ----------------------------------------------------------------------------------
def _cli(dsn: str, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`payment-service check ARGS` with only DATABASE_URL set among the service's variables."""
    env = clean_env(database_url=dsn)
    return subprocess.run(
        service_command("check", *args),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=workdir,
    )


async def test_the_command_exits_0_when_consistent_and_1_with_a_report_when_not(
    check_dsn: str, check_db: asyncpg.Connection, ids: dict[str, Any], tmp_path: Path
) -> None:
    dsn = check_dsn
    result = _cli(dsn, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("consistent")
    assert "ok    payment_events" in result.stdout

    await check_db.execute(
        "UPDATE payment_refunds SET amount = amount + 1 WHERE payment_id = $1", ids["partial"]
    )
    result = _cli(dsn, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  refund_sums" in result.stdout
    assert f"payment {ids['partial']}: refunds sum to 31.00, refunded_amount is 30.00" in (
        result.stdout
    )
    assert "INCONSISTENT: 1 of" in result.stdout

    result = _cli(dsn, tmp_path, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["consistent"] is False
    failed = [c for c in report["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["refund_sums"]
    assert failed[0]["violations"] == 1
    assert failed[0]["examples"][0]["id"] == str(ids["partial"])
    assert Decimal("0") <= Decimal(str(report["outbox_retention_hours"]))


def test_the_command_exits_2_when_the_database_cannot_be_read(tmp_path: Path) -> None:
    result = _cli(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot read the database" in result.stderr
    assert result.stdout == ""


# -- deliveries: required for the endpoints subscribed when the event was written -----------------
async def test_deliveries_are_required_per_endpoint_subscribed_before_the_event(
    db: asyncpg.Connection,
) -> None:
    """Events written by SQL (no API needed), fanned out as the API does, then some deliveries
    removed: only those to endpoints that wanted the event when it was written are missed."""
    for name, types in (("trip", ("payment.succeeded",)), ("held", ("*",)), ("off", ("*",))):
        await endpoints.insert_endpoint(
            db, name=name, url="http://127.0.0.1:9/x", event_types=types, operator=OPERATOR
        )
    await endpoints.set_state(db, "held", "PAUSED", operator=OPERATOR)
    await endpoints.set_state(db, "off", "DISABLED", operator=OPERATOR)
    await db.execute(
        "UPDATE endpoints SET created_at = now() - interval '1 day',"
        " state_changed_at = now() - interval '1 day', updated_at = now() - interval '1 day'"
    )
    charge, refund = await insert_events(db, payments=1, events_per_payment=2)
    await db.execute("UPDATE outbox_events SET created_at = now() - interval '1 hour'")
    await db.execute(FAN_OUT_SQL, None)
    await endpoints.insert_endpoint(
        db, name="late", url="http://127.0.0.1:9/late", operator=OPERATOR
    )

    def deliveries_check(report: Report) -> dict[str, str]:
        result = next(r for r in report.checks if r.name == "event_deliveries")
        return {example["id"]: example["detail"] for example in result.examples}

    assert deliveries_check(await run(db)) == {}  # `off` and `late` were never owed one
    await db.execute(
        "DELETE FROM deliveries WHERE endpoint_id IN"
        " (SELECT endpoint_id FROM endpoints WHERE name IN ('trip', 'held'))"
    )
    assert deliveries_check(await run(db)) == {
        str(charge.id): "no delivery to endpoint held, trip",
        str(refund.id): "no delivery to endpoint held",  # trip does not want refunds
    }
    # An endpoint changed since (its types may have been others) is owed nothing older.
    await endpoints.update_endpoint(db, "trip", event_types=("payment.*",), operator=OPERATOR)
    assert deliveries_check(await run(db)) == {
        str(charge.id): "no delivery to endpoint held",
        str(refund.id): "no delivery to endpoint held",
    }
    # Deliveries of events older than the retention may be gone with their delivery.
    assert deliveries_check(await run(db, retention=0.5)) == {}
