"""The command line checks what the admin API checks, prints what comes from outside as text, and
fails the way a Unix tool does: real `payment-service` processes against a real PostgreSQL.

- `endpoints add` refuses what the API refuses (tests/support/endpoint_inputs.py), one line on
  stderr, exit 2; in production, a loopback address unless ENDPOINT_ALLOWED_NETWORKS lists it;
- a receiver's answer printed by `outbox dead`, and a URL or reason printed by `endpoints list`,
  cannot drive the terminal;
- a time out of range is one line and exit 2, never a traceback;
- a reader that goes away (`| head -1`) ends the command quietly;
- `enable` after DISABLED names the gap and the exact `outbox replay` command that fills it;
- `remove` keeps the delivered history and drops only what was never delivered.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from payment_service import endpoints
from tests.support.commands import Finished, run_to_end, service_command
from tests.support.database import fan_out, insert_events
from tests.support.endpoint_inputs import BAD_INPUTS, BadInput
from tests.support.environment import SECRET, minimal_environment

Cli = Callable[..., Finished]
HOSTILE = "HTTP 500: \x1b]0;owned\x07\x1b[2J\x1b[31mred\rforged line\n\u202eevil"
PRODUCTION = {
    "environment": "production",
    "api_keys": "cli-tests:a-token-for-tests-only",
    "callback_signing_secret": SECRET,
    "gateway": "none",  # production's gateway rules are tested with the gateway's settings
}


@pytest.fixture
def cli(database_url: str, tmp_path: Path) -> Cli:
    """`payment-service ARGS` against this test's database (`env`: more settings)."""

    def run(*args: str, env: dict[str, object] | None = None) -> Finished:
        environment = minimal_environment(database_url=database_url, **(env or {}))
        return run_to_end(list(args), environment, tmp_path)

    return run


def assert_one_line_refusal(result: Finished, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(result.error_lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def add_args(bad: BadInput) -> list[str]:
    """`endpoints add` of a good endpoint, but for the one bad value."""
    values = {"name": "trip", "url": "http://127.0.0.1:9/t", "event_types": "*"}
    values[bad.field] = ",".join(bad.value) if isinstance(bad.value, list) else bad.value
    options = {"name": "--name", "url": "--url", "event_types": "--events", "secret": "--secret"}
    return ["endpoints", "add"] + [arg for f, v in values.items() for arg in (options[f], v)]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda bad: bad.label)
async def test_add_refuses_what_the_api_refuses(
    cli: Cli, db: asyncpg.Connection, bad: BadInput
) -> None:
    result = cli(*add_args(bad))
    assert_one_line_refusal(result, bad.words)
    assert "secret-pass" not in result.stderr, "a refusal never repeats a password"
    assert await db.fetchval("SELECT count(*) FROM endpoints WHERE name = 'trip'") == 0


async def test_production_refuses_a_loopback_address_unless_listed(
    cli: Cli, db: asyncpg.Connection
) -> None:
    for url in ("http://127.0.0.1:9/t", "http://[::1]:9/t", "http://localhost:9/t"):
        refused = cli("endpoints", "add", "--name", "trip", "--url", url, env=PRODUCTION)
        assert_one_line_refusal(refused, "a loopback address", "ENDPOINT_ALLOWED_NETWORKS")
        updated = cli("endpoints", "update", "notification", "--url", url, env=PRODUCTION)
        assert_one_line_refusal(updated, "a loopback address")
    listed = {**PRODUCTION, "endpoint_allowed_networks": "127.0.0.0/8"}
    added = cli("endpoints", "add", "--name", "trip", "--url", "http://127.0.0.1:9/t", env=listed)
    assert added.returncode == 0, added.stderr
    # A name is resolved when the relay connects, not here.
    named = cli("endpoints", "update", "trip", "--url", "http://trips.internal/t", env=PRODUCTION)
    assert named.returncode == 0, named.stderr
    assert await db.fetchval("SELECT url FROM endpoints WHERE name = 'trip'") == (
        "http://trips.internal/t"
    )


async def test_text_output_escapes_what_comes_from_outside(
    cli: Cli, db: asyncpg.Connection
) -> None:
    events = await insert_events(db, payments=2)
    await db.execute(
        "UPDATE deliveries SET status = 'DEAD', attempts = 12, last_status_code = 500,"
        " last_error = $1",
        HOSTILE,
    )
    # Rows written by hand (or by an older version) with a hostile URL and reason.
    await db.execute(
        "INSERT INTO endpoints (name, url, state, state_reason) VALUES ($1, $2, 'PAUSED', $3)",
        "odd",
        "http://h/\x1b[2J\x07",
        "reason\x1b]0;owned\x07\nforged",
    )
    dead = cli("outbox", "dead")
    listing = cli("endpoints", "list")
    for result in (dead, listing):
        assert result.returncode == 0, result.stderr
        for control in ("\x1b", "\x07", "\r", "\u202e"):
            assert control not in result.stdout, (control, result.stdout)
    assert len(dead.stdout.splitlines()) == len(events), "no forged lines"
    assert "HTTP 500: \\x1b]0;owned\\x07\\x1b[2J\\x1b[31mred\\rforged line\\n\\u202eevil" in (
        dead.stdout
    )
    assert "odd: http://h/\\x1b[2J\\x07" in listing.stdout
    assert "reason\\x1b]0;owned\\x07\\nforged" in listing.stdout
    # --json stays exact: JSON escapes control characters itself.
    as_json = cli("outbox", "dead", "--json")
    assert {row["last_error"] for row in json.loads(as_json.stdout)} == {HOSTILE}
    assert "\x1b" not in as_json.stdout


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--since", "99999-01-01T00:00:00+00:00", "is not an ISO 8601 time"),
        ("--since", "9999-12-31T23:59:59-01:00", "is out of range"),
        ("--since", "0001-01-01T00:00:00+01:00", "is out of range"),
        ("--since", "2025-01-31T09:00:00", "has no offset"),
        ("--until", "9999-12-31T23:30:00-05:00", "is out of range"),
    ],
)
def test_a_time_out_of_range_is_one_line_and_exit_2(
    cli: Cli, option: str, value: str, words: str
) -> None:
    since = "2025-01-01T00:00:00Z" if option == "--until" else value
    args = ["outbox", "replay", "--endpoint", "notification", "--since", since]
    if option == "--until":
        args += ["--until", value]
    assert_one_line_refusal(cli(*args), option, words)


def run_into_a_closed_pipe(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `payment-service ARGS` with stdout a pipe whose reader has gone; (exit code, stderr)."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            service_command(*args), env=env, stdout=write, stderr=subprocess.PIPE, text=True,
            timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    return result.returncode, result.stderr


async def test_a_closed_pipe_is_a_quiet_exit(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    await insert_events(db, payments=3000)
    await db.execute(
        "UPDATE deliveries SET status = 'DEAD', attempts = 12, last_error = 'HTTP 503: busy'"
    )
    env = minimal_environment(database_url=database_url)
    for args in (["outbox", "dead", "--limit", "3000"], ["endpoints", "list"], ["check"]):
        code, stderr = run_into_a_closed_pipe(args, env)
        assert (code, stderr) == (141, ""), (args, code, stderr)
    # As typed: the output is far larger than a pipe holds, so `head` leaves before it ends.
    piped = subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f"{' '.join(service_command('outbox', 'dead', '--limit', '3000'))} | head -1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert piped.stderr == "" and piped.returncode == 141, piped
    assert len(piped.stdout.splitlines()) == 1


async def test_enable_after_disabled_names_the_gap_and_the_command_that_fills_it(
    cli: Cli, db: asyncpg.Connection
) -> None:
    await endpoints.insert_endpoint(
        db, name="trip", url="http://127.0.0.1:9/t", event_types=("payment.succeeded",)
    )
    await insert_events(db, payments=2)  # before: trip has its deliveries
    assert cli("endpoints", "disable", "trip", "--reason", "receiver moving").returncode == 0
    disabled_at = (await endpoints.select_endpoint(db, "trip")).state_changed_at
    missed = await insert_events(db, payments=3, events_per_payment=2)  # 3 succeeded, 3 refunded
    assert await db.fetchval(
        "SELECT count(*) FROM deliveries JOIN endpoints USING (endpoint_id) WHERE name = 'trip'"
    ) == 2, "a DISABLED endpoint gets no deliveries"  # fmt: skip

    enabled = cli("endpoints", "enable", "trip")
    assert enabled.returncode == 0, enabled.stderr
    lines = enabled.stdout.splitlines()
    assert lines[0].startswith("enabled trip: http://127.0.0.1:9/t")
    assert lines[1] == (
        f"it was DISABLED from {disabled_at.isoformat()} and missed 3 event(s) written since "
        "(they got no delivery to it)"
    )
    command = f"payment-service outbox replay --endpoint trip --since {disabled_at.isoformat()}"
    assert lines[2] == f"to send them: {command}"

    replayed = cli(*command.split()[1:])  # the command exactly as printed
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith("trip: 3 event(s) in line again (3 it never had")
    got = await db.fetch(
        "SELECT e.event_id::text FROM deliveries AS d JOIN endpoints AS n USING (endpoint_id)"
        " JOIN outbox_events AS e ON e.id = d.event_id WHERE n.name = 'trip'"
    )
    succeeded = {e.event_id for e in missed if e.seq == 1}
    assert succeeded <= {row["event_id"] for row in got}

    again = cli("endpoints", "enable", "trip")  # not DISABLED now: nothing to name
    assert again.returncode == 0 and len(again.stdout.splitlines()) == 1, again.stdout


async def test_remove_keeps_the_delivered_history_and_drops_the_rest(
    cli: Cli, db: asyncpg.Connection
) -> None:
    await endpoints.insert_endpoint(db, name="trip", url="http://127.0.0.1:9/t")
    events = await insert_events(db, payments=4)
    trip = "(SELECT endpoint_id FROM endpoints WHERE name = 'trip')"
    await db.execute(
        "UPDATE deliveries SET status = 'DELIVERED', attempts = 1, delivered_at = now()"
        f" WHERE endpoint_id = {trip} AND event_id = ANY($1)",
        [e.id for e in events[:2]],
    )
    await db.execute(
        f"UPDATE deliveries SET status = 'DEAD', attempts = 12 WHERE endpoint_id = {trip}"
        " AND event_id = $1",
        events[2].id,
    )

    asked = cli("endpoints", "remove", "trip")
    assert_one_line_refusal(asked, "2 undelivered deliveries", "delivered ones stay")
    removed = cli("endpoints", "remove", "trip", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == (
        "removed endpoint trip and its 2 undelivered deliveries; its 2 delivered ones stay as "
        "history until retention"
    )
    kept = await db.fetch(
        "SELECT event_id, status, removed_endpoint FROM deliveries WHERE endpoint_id IS NULL"
    )
    assert sorted((r["event_id"], r["status"], r["removed_endpoint"]) for r in kept) == [
        (events[0].id, "DELIVERED", "trip"),
        (events[1].id, "DELIVERED", "trip"),
    ]
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 4 + 2  # notification's stay

    # Every reader takes the history in its stride.
    report = json.loads(cli("check", "--json").stdout)
    failed = {c["name"] for c in report["checks"] if not c["ok"]}
    # insert_events writes payments without idempotency records: only those checks fail.
    assert failed == {"payment_idempotency"}, failed
    stats = cli("outbox", "stats", "--json")
    assert [e["name"] for e in json.loads(stats.stdout)["endpoints"]] == ["notification"]
    assert cli("outbox", "dead").stdout.strip() == "no dead deliveries"
    # A new endpoint of the same name starts afresh; the history stays apart.
    again = cli("endpoints", "add", "--name", "trip", "--url", "http://127.0.0.1:9/t2")
    assert again.returncode == 0, again.stderr
    await fan_out(db)
    assert await db.fetchval(f"SELECT count(*) FROM deliveries WHERE endpoint_id = {trip}") == 4
    with pytest.raises(asyncpg.ForeignKeyViolationError):  # no silent cascade any more
        await db.execute("DELETE FROM endpoints WHERE name = 'trip'")
