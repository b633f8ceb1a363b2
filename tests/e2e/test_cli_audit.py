"""The command line's operator actions in the audit log, and `payment-service audit`: real
processes against a real PostgreSQL, the rows read back."""

from __future__ import annotations

import json
import os
import pwd
import socket
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from payment_service import audit
from payment_service.audit import Operator, Target
from tests.support.api import ApiFactory, create_payment
from tests.support.audit import EVERY_ENDPOINT_ACTION, audit_rows, audit_text
from tests.support.commands import Finished, run_to_end
from tests.support.database import insert_events
from tests.support.environment import minimal_environment, new_signing_secret

Cli = Callable[..., Finished]


@pytest.fixture
def cli(database_url: str, tmp_path: Path) -> Cli:
    """`payment-service ARGS` against this test's database; the finished process."""

    def run(*args: str) -> Finished:
        return run_to_end(list(args), minimal_environment(database_url=database_url), tmp_path)

    return run


async def test_every_endpoints_command_is_audited_as_the_user_running_it(
    cli: Cli, db: asyncpg.Connection
) -> None:
    secret, rotated = new_signing_secret(), new_signing_secret()
    steps = [
        ("add", "--name", "trip", "--url", "http://127.0.0.1:9/t", "--secret", secret),
        ("update", "trip", "--events", "payment.succeeded"),
        ("pause", "trip", "--reason", "deploying"),
        ("resume", "trip"),
        ("disable", "trip"),
        ("enable", "trip"),
        ("rotate-secret", "trip", "--secret", rotated),
        ("rotate-secret", "trip"),
        ("remove", "trip", "--yes"),
    ]
    for step in steps:
        result = cli("endpoints", *step)
        assert result.returncode == 0, (step, result.stderr)
    assert cli("endpoints", "pause", "nobody").returncode == 2  # refused: no row

    rows = await audit_rows(db)
    assert [row["action"] for row in rows] == EVERY_ENDPOINT_ACTION
    user = pwd.getpwuid(os.geteuid()).pw_name  # the tests' processes run as this user
    for row in rows:
        assert row["actor"] == f"cli:{user}", row
        assert row["origin"] == f"cli@{socket.gethostname()}", row
        assert (row["target_kind"], row["target_id"]) == ("endpoint", "trip"), row
    assert rows[2]["reason"] == "deploying"
    assert json.loads(rows[2]["after"]) == {"state": "PAUSED", "state_reason": "deploying"}
    assert json.loads(rows[1]["before"]) == {"event_types": ["*"]}
    text = await audit_text(db)
    for value in (secret, rotated):
        assert value.removeprefix("whsec_") not in text
    assert "whsec_" not in text


async def test_audit_prints_the_log_newest_first_escaped_and_filtered(
    cli: Cli, db: asyncpg.Connection
) -> None:
    assert cli("audit").stdout == "no audit entries\n"
    hostile = "\x1b]0;owned\x07\x1b[2Jred\rforged line\n\u202eevil"
    async with db.transaction():
        await audit.record(
            db,
            operator=Operator("admin:ops", "192.0.2.7"),
            action="endpoint.pause",
            target=Target("endpoint", "trip"),
            before={"state": "ACTIVE"},
            after={"state": "PAUSED"},
            reason=hostile,
        )
    assert (
        cli("endpoints", "add", "--name", "driver", "--url", "http://127.0.0.1:9/d").returncode == 0
    )

    printed = cli("audit")
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert len(lines) == 2, printed.stdout
    assert " endpoint.add  endpoint:driver  from cli@" in lines[0]
    assert (
        "  admin:ops  endpoint.pause  endpoint:trip  from 192.0.2.7  state ACTIVE → PAUSED"
        in (lines[1])
    )
    assert "\x1b" not in printed.stdout and "\r" not in printed.stdout
    assert "reason: \\x1b]0;owned\\x07\\x1b[2Jred\\rforged line\\n\\u202eevil" in lines[1]

    as_json = json.loads(cli("audit", "--json").stdout)
    assert [entry["action"] for entry in as_json] == ["endpoint.add", "endpoint.pause"]
    assert as_json[1]["reason"] == hostile and as_json[1]["origin"] == "192.0.2.7"
    assert as_json[1]["target"] == {"kind": "endpoint", "id": "trip"}
    assert as_json[1]["before"] == {"state": "ACTIVE"}

    def actions(*args: str) -> list[str]:
        result = cli("audit", "--json", *args)
        assert result.returncode == 0, result.stderr
        return [entry["action"] for entry in json.loads(result.stdout)]

    assert actions("--actor", "admin:ops") == ["endpoint.pause"]
    assert actions("--action", "endpoint.add") == ["endpoint.add"]
    assert actions("--action", "endpoint.*", "--limit", "1") == ["endpoint.add"]
    assert actions("--target", "trip") == ["endpoint.pause"]
    assert actions("--target", "endpoint:driver") == ["endpoint.add"]
    assert actions("--since", "2999-01-01T00:00:00Z") == []
    assert actions("--until", "2000-01-01T00:00:00+05:30") == []
    assert actions("--since", "2000-01-01T00:00:00Z") == ["endpoint.add", "endpoint.pause"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "yesterday"), "--since 'yesterday' is not an ISO 8601 time"),
        (("--until", "2025-01-01T00:00:00"), "has no offset"),
        (("--limit", "0"), "--limit must be at least 1"),
    ],
)
def test_audit_refuses_bad_input_with_one_line(
    cli: Cli, args: tuple[str, ...], message: str
) -> None:
    result = cli("audit", *args)
    assert result.returncode == 2 and len(result.error_lines) == 1, result.stderr
    assert message in result.stderr, result.stderr


async def test_outbox_replays_are_audited_as_the_user_running_them(
    cli: Cli, db: asyncpg.Connection
) -> None:
    events = await insert_events(db, payments=2)
    await db.execute("UPDATE deliveries SET status = 'DEAD'")
    replayed = cli("outbox", "replay", "--dead", "--endpoint", "notification")
    assert replayed.returncode == 0, replayed.stderr
    since = "2000-01-01T00:00:00Z"
    ranged = cli("outbox", "replay", "--endpoint", "notification", "--since", since)
    assert ranged.returncode == 0, ranged.stderr
    one = cli("outbox", "replay", "--event-id", events[0].event_id)  # nothing dead now: exit 1
    assert one.returncode == 1, one.stderr

    rows = await audit_rows(db, action="deliveries.replay")
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert [(r["actor"], r["target_kind"], r["target_id"]) for r in rows] == [
        (f"cli:{user}", "endpoint", "notification"),
        (f"cli:{user}", "endpoint", "notification"),
        (f"cli:{user}", "event", events[0].event_id),
    ]
    assert json.loads(rows[0]["after"]) == {"dead": True, "replayed": 2, "to": {"notification": 2}}
    assert json.loads(rows[1]["after"])["again"] == 2
    assert json.loads(rows[2]["after"])["replayed"] == 0, (
        "asked for, and recorded, with nothing done"
    )


async def test_a_settlement_from_the_command_line_is_audited_as_the_user_running_it(
    cli: Cli, db: asyncpg.Connection, api_factory: ApiFactory
) -> None:
    """`gateway settle` decides a PENDING payment through the admin API's settlement: its row
    `payment.settle` names the operating-system user; a second run with the same key settles
    nothing more, a decided payment is refused (exit 1), bad input exits 2."""
    api = await api_factory()
    pending = await create_payment(api.client, method="UPI")
    payment_id = str(pending["payment_id"])

    settled = cli(
        "gateway", "settle", payment_id, "FAILED", "--reason", "bank: <b>declined</b>",
        "--idempotency-key", "cli-settle-1",
    )  # fmt: skip
    assert settled.returncode == 0, settled.stderr
    assert f"payment {payment_id} {pending['reference']}: FAILED" in settled.stdout
    again = cli(
        "gateway", "settle", payment_id, "FAILED", "--reason", "bank: <b>declined</b>",
        "--idempotency-key", "cli-settle-1",
    )  # fmt: skip
    assert again.returncode == 0 and "already" in again.stdout, again.stderr
    refused = cli("gateway", "settle", payment_id, "SUCCESS", "--reason", "changed my mind")
    assert refused.returncode == 1 and "is FAILED" in refused.stderr, refused.stderr
    missing = cli("gateway", "settle", "987654", "SUCCESS", "--reason", "who?")
    assert missing.returncode == 1 and "No payment" in missing.stderr, missing.stderr
    for bad in (["SUCCESS"], ["MAYBE", "--reason", "x"]):  # argparse: usage, then the error
        assert cli("gateway", "settle", payment_id, *bad).returncode == 2, bad
    empty = cli("gateway", "settle", payment_id, "SUCCESS", "--reason", "")
    assert empty.returncode == 2 and len(empty.error_lines) == 1, empty.stderr
    assert "reason" in empty.stderr

    (row,) = await audit_rows(db, action="payment.settle")
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert (row["actor"], row["origin"]) == (f"cli:{user}", f"cli@{socket.gethostname()}")
    assert (row["target_kind"], row["target_id"]) == ("payment", payment_id)
    assert json.loads(row["before"]) == {"status": "PENDING"}
    assert json.loads(row["after"]) == {"status": "FAILED"}
    assert row["reason"] == "bank: <b>declined</b>"
    failure = await db.fetchval(
        "SELECT failure_message FROM payments WHERE payment_id = $1", pending["payment_id"]
    )
    assert failure == "bank: <b>declined</b>"
