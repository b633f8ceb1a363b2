"""The audit log: written in the transaction of the change it records, never holding a secret,
append-only, read in keyset pages with filters that use their indexes; and every endpoint action
of the admin API recorded with its actor, origin, target and what changed (GET /admin/audit
shows them). Real PostgreSQL, the real app over HTTP."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from app.admin import AuditList
from payment_service import audit, endpoints
from payment_service.audit import AuditError, Operator, Target
from tests.integration.conftest import ApiFactory
from tests.support.api import RunningApi, assert_problem
from tests.support.audit import EVERY_ENDPOINT_ACTION, OPERATOR, audit_rows, audit_text
from tests.support.database import insert_events
from tests.support.environment import new_signing_secret

ADMIN_TOKEN = "admin-token-for-the-audit-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRIP = Target("endpoint", "trip")


# -- the core -------------------------------------------------------------------------------------
async def test_a_row_is_written_only_inside_the_changes_transaction(db: asyncpg.Connection) -> None:
    with pytest.raises(AuditError, match="transaction"):
        await audit.record(db, operator=OPERATOR, action="endpoint.pause", target=TRIP)
    # Rolled back with the change it records.
    with pytest.raises(RuntimeError):
        async with db.transaction():
            await audit.record(db, operator=OPERATOR, action="endpoint.pause", target=TRIP)
            raise RuntimeError("the change failed")
    assert await audit_rows(db) == []
    async with db.transaction():
        entry = await audit.record(
            db,
            operator=Operator("cli:alice", "cli@ops-1"),
            action="endpoint.pause",
            target=TRIP,
            before={"state": "ACTIVE"},
            after={"state": "PAUSED"},
            reason="deploying",
        )
    (row,) = await audit_rows(db)
    assert (row["actor"], row["origin"], row["action"]) == ("cli:alice", "cli@ops-1", entry.action)
    assert (row["target_kind"], row["target_id"], row["reason"]) == (
        "endpoint",
        "trip",
        "deploying",
    )
    assert json.loads(row["before"]) == {"state": "ACTIVE"}
    assert json.loads(row["after"]) == {"state": "PAUSED"}
    assert row["at"] == await db.fetchval("SELECT at FROM audit_log")  # the database's clock
    assert entry.audit_id == row["audit_id"]


async def test_a_secret_is_never_recorded(db: asyncpg.Connection) -> None:
    secret = new_signing_secret()
    async with db.transaction():
        for before, after in (({"secret": secret}, None), (None, {"nested": [{"s": secret}]})):
            with pytest.raises(AuditError, match="never holds a secret"):
                await audit.record(
                    db,
                    operator=OPERATOR,
                    action="endpoint.rotate_secret",
                    target=TRIP,
                    before=before,
                    after=after,
                )
        # Typed into a reason, it is masked.
        await audit.record(
            db,
            operator=OPERATOR,
            action="endpoint.rotate_secret",
            target=TRIP,
            reason=f"leaked: {secret}",
        )
    assert secret.removeprefix("whsec_") not in await audit_text(db)
    assert [row["reason"] for row in await audit_rows(db)] == ["leaked: whsec_…"]


async def test_the_log_is_append_only(db: asyncpg.Connection) -> None:
    async with db.transaction():
        await audit.record(db, operator=OPERATOR, action="endpoint.pause", target=TRIP)
    for statement in (
        "UPDATE audit_log SET actor = 'cli:mallory'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await db.execute(statement)
    assert [row["actor"] for row in await audit_rows(db)] == [OPERATOR.actor]


async def _fill(db: asyncpg.Connection, count: int) -> None:
    """`count` rows one second apart, ending now: alternating actors, actions and targets."""
    await db.execute(
        """
        INSERT INTO audit_log (at, actor, action, target_kind, target_id, origin)
        SELECT now() - make_interval(secs => $1 - g),
               CASE WHEN g % 2 = 0 THEN 'admin:ops' ELSE 'cli:alice' END,
               CASE WHEN g % 3 = 0 THEN 'endpoint.pause' ELSE 'endpoint.resume' END,
               'endpoint',
               'endpoint-' || (g % 5),
               'tests'
          FROM generate_series(1, $1) AS g
        """,
        count,
    )


async def test_pages_newest_first_with_filters(db: asyncpg.Connection) -> None:
    await _fill(db, 30)
    seen: list[int] = []
    before_id = None
    while True:
        page = await audit.select_audit(db, limit=7, before_id=before_id)
        seen += [entry.audit_id for entry in page.entries]
        if not page.has_more:
            break
        before_id = page.entries[-1].audit_id
    assert seen == list(range(30, 0, -1)), "newest first, every entry once"

    async def ids(**filters: Any) -> list[int]:
        page = await audit.select_audit(db, limit=100, **filters)
        return [entry.audit_id for entry in page.entries]

    assert await ids(actor="admin:ops") == list(range(30, 0, -2))
    assert await ids(action="endpoint.pause") == list(range(30, 0, -3))
    assert len(await ids(action="endpoint.*")) == 30
    assert await ids(action="payment.*") == []
    assert await ids(target="endpoint:endpoint-0") == [30, 25, 20, 15, 10, 5]
    assert await ids(target="endpoint-0") == [30, 25, 20, 15, 10, 5]
    assert await ids(target="payment:endpoint-0") == []
    newest = await db.fetchval("SELECT at FROM audit_log WHERE audit_id = 30")
    assert await ids(since=newest - timedelta(seconds=2)) == [30, 29, 28]
    assert await ids(until=newest - timedelta(seconds=27)) == [2, 1]
    both = await ids(actor="cli:alice", action="endpoint.pause", target="endpoint-3")
    assert both == [3]


async def test_every_filter_is_served_by_an_index(db: asyncpg.Connection) -> None:
    """EXPLAIN each filter's statement over 100,000 entries, most of them alike: no sequential
    scan of the log, a page of it read in the index's order (no sort), and a rare actor, action
    or target found through its own index (the few rows then sorted)."""
    await db.execute(
        """
        INSERT INTO audit_log (at, actor, action, target_kind, target_id, origin)
        SELECT now() - make_interval(secs => 100000 - g), 'admin:ops', 'endpoint.pause',
               'endpoint', 'endpoint-' || (g % 5), 'tests'
          FROM generate_series(1, 100000) AS g
        """
    )
    async with db.transaction():
        await audit.record(
            db, operator=Operator("cli:alice", "tests"), action="endpoint.remove", target=TRIP
        )
    await db.execute("ANALYZE audit_log")
    now = await db.fetchval("SELECT now()")
    values: dict[str, Any] = {
        "since": now - timedelta(minutes=5),
        "until": now - timedelta(hours=20),
        "actor": "cli:alice",
        "action": "endpoint.remove",
        "action_prefix": "endpoint.",
        "target_kind": "endpoint",
        "target_id": "trip",
        "before_id": 50_000,
    }
    index = {"actor": "actor", "action": "action", "target_id": "target"}
    for filters in [(), *[(name,) for name in values], ("actor", "before_id")]:
        statement = audit.page_statement(frozenset(filters))
        args = statement.args(**{name: values[name] for name in filters}, limit=21)
        plan = "\n".join(row[0] for row in await db.fetch("EXPLAIN " + statement.sql, *args))
        assert "Seq Scan on audit_log" not in plan, f"{filters}:\n{plan}"
        if set(filters) <= {"since", "until", "before_id"}:  # a page read in index order
            assert "Sort" not in plan, f"{filters}:\n{plan}"
        for name in filters:
            if name in index:
                assert f"audit_log_{index[name]}_idx" in plan, f"{filters}:\n{plan}"


# -- the admin API --------------------------------------------------------------------------------
@pytest.fixture
async def admin_api(api_factory: ApiFactory) -> RunningApi:
    return await api_factory(admin_api_keys=(f"ops:{ADMIN_TOKEN}",))


@pytest.fixture
def admin(admin_api: RunningApi) -> httpx.AsyncClient:
    return admin_api.new_client(headers=ADMIN)


async def test_every_endpoint_action_of_the_admin_api_is_audited_without_its_secret(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    secret, rotated = new_signing_secret(), new_signing_secret()
    url = "http://127.0.0.1:9/trips"
    steps = [
        ("POST", "/admin/endpoints", {"name": "trip", "url": url, "secret": secret}),
        ("PATCH", "/admin/endpoints/trip", {"event_types": ["payment.succeeded"]}),
        ("POST", "/admin/endpoints/trip/pause", {"reason": "deploying"}),
        ("POST", "/admin/endpoints/trip/resume", None),
        ("POST", "/admin/endpoints/trip/disable", None),
        ("POST", "/admin/endpoints/trip/enable", None),
        ("POST", "/admin/endpoints/trip/rotate-secret", {"secret": rotated}),
        ("POST", "/admin/endpoints/trip/rotate-secret", None),
        ("DELETE", "/admin/endpoints/trip", None),
    ]
    for method, path, body in steps:
        response = await admin.request(method, path, json=body)
        assert response.status_code in (200, 201), (path, response.text)
    generated = (await admin.get("/admin/endpoints")).text  # nothing left to show a secret
    assert "whsec_" not in generated

    rows = await audit_rows(db)
    assert [row["action"] for row in rows] == EVERY_ENDPOINT_ACTION
    for row in rows:
        assert (row["actor"], row["origin"]) == ("admin:ops", "127.0.0.1"), row
        assert (row["target_kind"], row["target_id"]) == ("endpoint", "trip"), row
    changes = [(json.loads(row["before"] or "null"), json.loads(row["after"])) for row in rows]
    add, update, pause, resume, disable, enable, rotate, again, remove = changes
    assert add[0] is None
    assert add[1] == {
        "url": url,
        "event_types": ["*"],
        "state": "ACTIVE",
        "state_reason": None,
        "breaker": "closed",
        "signed": True,
        "previous_secrets_expire_at": [],
    }
    assert update == ({"event_types": ["*"]}, {"event_types": ["payment.succeeded"]})
    assert pause == (
        {"state": "ACTIVE", "state_reason": None},
        {"state": "PAUSED", "state_reason": "deploying"},
    )
    assert rows[2]["reason"] == "deploying"
    assert resume == (
        {"state": "PAUSED", "state_reason": "deploying"},
        {"state": "ACTIVE", "state_reason": None},
    )
    assert disable[1] == {"state": "DISABLED", "state_reason": "disabled by admin:ops"}
    assert enable[1] == {"state": "ACTIVE", "state_reason": None}
    # A rotation says it happened and until when the replaced secret signs; never the secrets.
    assert rotate[0] == {"previous_secrets_expire_at": []}
    assert len(rotate[1]["previous_secrets_expire_at"]) == 1
    assert len(again[1]["previous_secrets_expire_at"]) == 2
    assert remove[0]["url"] == url and remove[1] == {"undelivered_removed": 0, "delivered_kept": 0}
    text = await audit_text(db)
    for value in (secret, rotated):
        assert value.removeprefix("whsec_") not in text
    assert "whsec_" not in text


async def test_a_refused_action_writes_no_row(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await admin.post("/admin/endpoints", json={"name": "trip", "url": "http://127.0.0.1:9/t"})
    await admin.post("/admin/endpoints/trip/disable")
    assert_problem(await admin.post("/admin/endpoints/trip/resume"), 409, "ENDPOINT_CONFLICT")
    assert_problem(await admin.post("/admin/endpoints/nobody/pause"), 404, "ENDPOINT_NOT_FOUND")
    assert [row["action"] for row in await audit_rows(db)] == ["endpoint.add", "endpoint.disable"]


async def test_get_audit_filters_and_pages(
    admin: httpx.AsyncClient, admin_api: RunningApi, db: asyncpg.Connection
) -> None:
    await admin.post("/admin/endpoints", json={"name": "trip", "url": "http://127.0.0.1:9/t"})
    await admin.post("/admin/endpoints/trip/pause")
    await admin.post("/admin/endpoints/notification/pause")
    await admin.post("/admin/endpoints/notification/resume")
    async with db.transaction():
        await endpoints.pause(db, "trip", operator=Operator("cli:alice", "cli@ops-1"))

    everything = await admin.get("/admin/audit")
    assert everything.status_code == 200, everything.text
    listing = AuditList.model_validate(everything.json())
    assert [(e.actor, e.action, e.target.id) for e in listing.data] == [
        ("cli:alice", "endpoint.pause", "trip"),
        ("admin:ops", "endpoint.resume", "notification"),
        ("admin:ops", "endpoint.pause", "notification"),
        ("admin:ops", "endpoint.pause", "trip"),
        ("admin:ops", "endpoint.add", "trip"),
    ]
    assert not listing.has_more

    async def actions(**params: Any) -> list[str]:
        response = await admin.get("/admin/audit", params=params)
        assert response.status_code == 200, response.text
        return [entry["action"] + " " + entry["target"]["id"] for entry in response.json()["data"]]

    assert await actions(actor="cli:alice") == ["endpoint.pause trip"]
    assert await actions(target="endpoint:trip", actor="admin:ops") == [
        "endpoint.pause trip",
        "endpoint.add trip",
    ]
    assert await actions(action="endpoint.resume") == ["endpoint.resume notification"]
    assert len(await actions(action="endpoint.*")) == 5
    first = (await admin.get("/admin/audit", params={"limit": 2})).json()
    assert first["has_more"] and len(first["data"]) == 2
    second = (
        await admin.get(
            "/admin/audit", params={"limit": 2, "starting_after": first["data"][-1]["audit_id"]}
        )
    ).json()
    assert [e["audit_id"] for e in second["data"]] == [
        e.audit_id for e in listing.data[2:4]
    ] and second["has_more"]
    newest = listing.data[0].at
    since = (newest - timedelta(microseconds=1)).isoformat()
    assert await actions(since=since) == ["endpoint.pause trip"]
    assert await actions(until=newest.isoformat(), limit=1) == ["endpoint.resume notification"]

    for params in (
        {"limit": 0},
        {"limit": 101},
        {"since": "yesterday"},
        {"since": "2025-01-01T00:00:00"},  # no offset
        {"actor": "a\u0000b"},
        {"action": "Endpoint.Pause"},
        {"starting_after": "-1"},
        {"colour": "red"},
    ):
        assert_problem(await admin.get("/admin/audit", params=params), 400, "VALIDATION_ERROR")
    unauthenticated = await admin_api.client.get("/admin/audit")
    assert_problem(unauthenticated, 401, "UNAUTHORIZED")


async def test_openapi_documents_get_audit_behind_the_admin_key(admin: httpx.AsyncClient) -> None:
    document = (await admin.get("/openapi.json")).json()
    operation = document["paths"]["/admin/audit"]["get"]
    assert operation["security"] == [{"admin": []}]
    parameters = {parameter["name"] for parameter in operation["parameters"]}
    assert parameters == {"since", "until", "actor", "action", "target", "limit", "starting_after"}
    assert {"200", "400", "401"} <= set(operation["responses"])


async def test_replays_through_the_admin_api_preview_then_run_audited(
    admin: httpx.AsyncClient, admin_api: RunningApi, db: asyncpg.Connection
) -> None:
    await admin.post("/admin/endpoints", json={"name": "trip", "url": "http://127.0.0.1:9/t"})
    events = await insert_events(db, payments=4)
    await db.execute(
        "UPDATE deliveries SET status = 'DEAD' WHERE event_id = ANY ($1::bigint[])",
        [e.id for e in events[:2]],
    )
    preview = await admin.get("/admin/deliveries/dead")
    assert preview.status_code == 200, preview.text
    assert preview.json() == {
        "data": [
            {"endpoint": "notification", "state": "ACTIVE", "dead": 2},
            {"endpoint": "trip", "state": "ACTIVE", "dead": 2},
        ]
    }
    only = (await admin.get("/admin/deliveries/dead", params={"endpoint": "trip"})).json()
    assert only["data"] == [{"endpoint": "trip", "state": "ACTIVE", "dead": 2}]
    done = await admin.post(
        "/admin/deliveries/replay-dead", json={"endpoint": "trip", "reason": "fixed"}
    )
    assert done.status_code == 200, done.text
    assert done.json() == {"replayed": 2, "to": {"trip": 2}, "superseded": 0}
    everything = await admin.post("/admin/deliveries/replay-dead")  # no body: every one
    assert everything.json() == {"replayed": 2, "to": {"notification": 2}, "superseded": 0}

    since = "2000-01-01T00:00:00+00:00"
    ranged = await admin.get("/admin/endpoints/trip/replay", params={"since": since})
    assert ranged.json() == {"endpoint": "trip", "added": 0, "again": 4, "state": "ACTIVE"}
    done = await admin.post("/admin/endpoints/trip/replay", json={"since": since})
    assert done.json() == {"endpoint": "trip", "added": 0, "again": 4, "state": "ACTIVE"}
    empty = await admin.post("/admin/endpoints/trip/replay", json={"since": since, "until": since})
    assert empty.json() == {"endpoint": "trip", "added": 0, "again": 0, "state": "ACTIVE"}

    for method, path, body in (
        ("POST", "/admin/endpoints/trip/replay", {}),
        ("POST", "/admin/endpoints/trip/replay", {"since": "yesterday"}),
        ("POST", "/admin/deliveries/replay-dead", {"event_id": "not-a-uuid"}),
        ("POST", "/admin/deliveries/replay-dead", {"colour": "red"}),
    ):
        assert_problem(await admin.request(method, path, json=body), 400, "VALIDATION_ERROR")
    assert_problem(
        await admin.post("/admin/endpoints/nobody/replay", json={"since": since}),
        404,
        "ENDPOINT_NOT_FOUND",
    )
    assert_problem(
        await admin.post("/admin/deliveries/replay-dead", json={"endpoint": "nobody"}), 404
    )
    assert_problem(await admin_api.client.post("/admin/deliveries/replay-dead"), 401)

    rows = await audit_rows(db, action="deliveries.replay")
    assert [(r["actor"], r["target_kind"], r["target_id"]) for r in rows] == [
        ("admin:ops", "endpoint", "trip"),
        ("admin:ops", "deliveries", "dead"),
        ("admin:ops", "endpoint", "trip"),
        ("admin:ops", "endpoint", "trip"),
    ]
    assert rows[0]["reason"] == "fixed" and rows[0]["origin"] == "127.0.0.1"
    assert json.loads(rows[2]["after"])["again"] == 4
