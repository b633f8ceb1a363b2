"""`payment-service endpoints …` and seeding at `migrate` and `run`, as a user runs them: real
processes against a real PostgreSQL, the rows read back."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from payment_service.embedded import free_port
from payment_service.endpoints import select_endpoint
from tests.support.commands import Finished, run_to_end, service_command
from tests.support.database import insert_events
from tests.support.environment import SECRET, minimal_environment, new_signing_secret
from tests.support.waiting import wait_until

ACTIONS = (
    "list",
    "add",
    "update",
    "pause",
    "resume",
    "enable",
    "disable",
    "rotate-secret",
    "remove",
)


EndpointsCli = Callable[..., Finished]


@pytest.fixture
def endpoints_cli(database_url: str, tmp_path: Path) -> EndpointsCli:
    """`payment-service endpoints ARGS` against this test's database; the finished process."""

    def run(*args: str) -> Finished:
        env = minimal_environment(database_url=database_url)
        return run_to_end(["endpoints", *args], env, tmp_path)

    return run


def listed(result: Finished) -> dict[str, dict[str, object]]:
    assert result.returncode == 0, result.stderr
    return {endpoint["name"]: endpoint for endpoint in json.loads(result.stdout)}


async def test_add_list_update_pause_resume_disable_enable_rotate_remove(
    endpoints_cli: EndpointsCli, db: asyncpg.Connection
) -> None:
    added = endpoints_cli(
        "add", "--name", "trip", "--url", "http://127.0.0.1:9/trips/payment-events",
        "--events", "payment.succeeded,payment.refunded",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    secret = await db.fetchval("SELECT secret FROM endpoints WHERE name = 'trip'")
    assert secret.startswith("whsec_") and secret in added.stdout  # printed once, here

    everything = endpoints_cli("list", "--json")
    assert "whsec_" not in everything.stdout  # never a secret
    trip = listed(everything)["trip"]
    assert trip["url"] == "http://127.0.0.1:9/trips/payment-events"
    assert trip["event_types"] == ["payment.succeeded", "payment.refunded"]
    assert (trip["state"], trip["breaker"]) == ("ACTIVE", "closed")
    assert set(listed(everything)) == {"notification", "trip"}
    assert "trip: http://127.0.0.1:9/trips/payment-events" in endpoints_cli("list").stdout

    assert endpoints_cli("update", "trip", "--events", "payment.*").returncode == 0
    assert endpoints_cli("update", "trip", "--url", "https://trips.test/hook").returncode == 0
    trip = listed(endpoints_cli("list", "--json"))["trip"]
    assert (trip["url"], trip["event_types"]) == ("https://trips.test/hook", ["payment.*"])

    paused = endpoints_cli("pause", "trip", "--reason", "maintenance")
    assert paused.returncode == 0 and "PAUSED (maintenance)" in paused.stdout
    assert listed(endpoints_cli("list", "--json"))["trip"]["state"] == "PAUSED"
    assert endpoints_cli("resume", "trip").returncode == 0
    assert listed(endpoints_cli("list", "--json"))["trip"]["state"] == "ACTIVE"

    assert endpoints_cli("disable", "trip", "--reason", "gone").returncode == 0
    refused = endpoints_cli("resume", "trip")  # a DISABLED endpoint is enabled on purpose
    assert refused.returncode == 2 and "endpoints enable trip" in refused.stderr
    assert listed(endpoints_cli("list", "--json"))["trip"]["state_reason"] == "gone"
    assert endpoints_cli("enable", "trip").returncode == 0
    trip = listed(endpoints_cli("list", "--json"))["trip"]
    assert (trip["state"], trip["state_reason"]) == ("ACTIVE", None)

    rotated = endpoints_cli("rotate-secret", "trip")
    assert rotated.returncode == 0, rotated.stderr
    now = await select_endpoint(db, "trip")
    assert now.secret is not None and now.signing_secrets() == [now.secret, secret]
    assert now.secret in rotated.stdout and secret not in rotated.stdout
    assert "a previous secret signs callbacks too until " in rotated.stdout
    chosen = new_signing_secret()
    assert endpoints_cli("rotate-secret", "trip", "--secret", chosen).returncode == 0
    assert await db.fetchval("SELECT secret FROM endpoints WHERE name = 'trip'") == chosen

    # One event for trip, undelivered: `remove` says it goes too, and wants --yes.
    await insert_events(db, payments=1)  # fanned out as the API does: notification and trip
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 2
    unsure = endpoints_cli("remove", "trip")
    assert unsure.returncode == 2 and "1 undelivered" in unsure.stderr and "--yes" in unsure.stderr
    assert await db.fetchval("SELECT count(*) FROM endpoints WHERE name = 'trip'") == 1
    removed = endpoints_cli("remove", "trip", "--yes")
    assert removed.returncode == 0 and "1 undelivered" in removed.stdout
    assert set(listed(endpoints_cli("list", "--json"))) == {"notification"}
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("pause", "nobody"), "no endpoint named 'nobody'"),
        (("remove", "nobody", "--yes"), "no endpoint named 'nobody'"),
        (("rotate-secret", "nobody"), "no endpoint named 'nobody'"),
        (("add", "--name", "x", "--url", "ftp://host/x"), "invalid endpoint URL"),
        (("add", "--name", "Bad Name", "--url", "http://h/x"), "invalid endpoint name"),
        (
            ("add", "--name", "x", "--url", "http://h/x", "--events", "payment.nope"),
            "unknown event",
        ),
        (("add", "--name", "x", "--url", "http://h/x", "--secret", "plain"), "whsec_"),
        (("add", "--name", "notification", "--url", "http://h/x"), "exists already"),
        (("update", "notification"), "give --url and/or --events"),
        (("update", "notification", "--events", ","), "at least one event type"),
    ],
)
def test_unknown_endpoints_and_bad_input_exit_2_with_one_line(
    endpoints_cli: EndpointsCli, args: tuple[str, ...], message: str
) -> None:
    result = endpoints_cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.error_lines) == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("action", ACTIONS)
def test_every_endpoints_command_has_help(action: str, tmp_path: Path) -> None:
    result = run_to_end(["endpoints", action, "--help"], minimal_environment(), tmp_path)
    assert result.returncode == 0 and "usage: payment-service endpoints" in result.stdout


def seeding_environment(database_url: str, **more: object) -> dict[str, str]:
    settings: dict[str, object] = {
        "database_url": database_url,
        "notification_service_url": "http://127.0.0.1:9001",
        "trip_service_url": "http://127.0.0.1:9002",
        "trip_callback_path": "/trips/payment-events",
        "trip_event_types": "payment.succeeded,payment.refunded",
        "callback_signing_secret": SECRET,
    }
    return minimal_environment(**(settings | more))


async def endpoint_rows(db: asyncpg.Connection) -> dict[str, tuple[str, list[str], str, bool]]:
    rows = await db.fetch("SELECT name, url, event_types, secret, seeded FROM endpoints")
    return {r["name"]: (r["url"], list(r["event_types"]), r["secret"], r["seeded"]) for r in rows}


def printed(stdout: str) -> list[str]:
    """What a command printed for the person at the terminal: its lines but the JSON logs."""
    return [line for line in stdout.splitlines() if not line.startswith("{")]


async def test_migrate_seeds_endpoints_that_follow_the_settings_until_an_operator_changes_them(
    empty_database_url: str, tmp_path: Path
) -> None:
    env = seeding_environment(empty_database_url)
    first = run_to_end(["migrate"], env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert printed(first.stdout)[1:] == [
        "configured endpoint notification from the settings: http://127.0.0.1:9001/notifications",
        "seeded endpoint trip from the settings: http://127.0.0.1:9002/trips/payment-events",
    ]
    db = await asyncpg.connect(empty_database_url)
    try:
        assert await endpoint_rows(db) == {
            "notification": ("http://127.0.0.1:9001/notifications", ["*"], SECRET, True),
            "trip": (
                "http://127.0.0.1:9002/trips/payment-events",
                ["payment.succeeded", "payment.refunded"],
                SECRET,
                True,
            ),
        }

        # The settings change: the endpoints still as seeding made them follow, and it is said.
        newer = new_signing_secret()
        moved = seeding_environment(
            empty_database_url,
            notification_service_url="http://127.0.0.1:9011",
            trip_event_types="payment.*",
            callback_signing_secret=newer,
        )
        second = run_to_end(["migrate"], moved, tmp_path)
        assert second.returncode == 0, second.stderr
        said = printed(second.stdout)
        assert said[:2] == [
            "database is up to date",
            "endpoint notification follows NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH: "
            "url http://127.0.0.1:9001/notifications → http://127.0.0.1:9011/notifications",
        ]
        # then the secret of both, and trip's event types (each line as the seeding tests show)
        assert [line.split(" follows ")[0] for line in said[2:]] == [
            "endpoint notification",
            "endpoint trip",
            "endpoint trip",
        ]
        assert "warning" not in second.stderr
        assert SECRET not in second.stdout + second.stderr
        assert newer not in second.stdout + second.stderr
        rows = await endpoint_rows(db)
        assert rows["notification"] == ("http://127.0.0.1:9011/notifications", ["*"], newer, True)
        assert rows["trip"][1:] == (["payment.*"], newer, True)
        # receivers that still verify with the old secret keep working for a day
        notification = await select_endpoint(db, "notification")
        assert notification.signing_secrets() == [newer, SECRET]

        # An operator changes notification by hand: from then on the settings do not move it,
        # and every start names the difference.
        changed = run_to_end(
            ["endpoints", "update", "notification", "--url", "http://127.0.0.1:9003/n"],
            moved,
            tmp_path,
        )
        assert changed.returncode == 0, changed.stderr
        before = await endpoint_rows(db)
        assert before["notification"][3] is False
        third = run_to_end(
            ["migrate"],
            seeding_environment(
                empty_database_url,
                notification_service_url="http://127.0.0.1:9021",
                trip_event_types="payment.*",
                callback_signing_secret=newer,
            ),
            tmp_path,
        )
        assert third.returncode == 0, third.stderr
        assert printed(third.stdout) == ["database is up to date"]  # nothing seeded or followed
        assert (
            "payment-service: warning: endpoint notification differs from "
            "NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH: url http://127.0.0.1:9003/n, "
            "the settings say http://127.0.0.1:9021/notifications (set by an operator; "
            "`payment-service endpoints update notification --url …` to change it)"
        ) in third.stderr.splitlines()
        assert "trip" not in third.stderr  # still as the settings say
        assert await endpoint_rows(db) == before
    finally:
        await db.close()


async def test_run_seeds_endpoints_before_starting_the_api(
    database_url: str, db: asyncpg.Connection, tmp_path: Path
) -> None:
    env = seeding_environment(database_url, service_port=free_port(), log_level="WARNING")
    env["HOME"] = str(tmp_path)
    err = tmp_path / "run.err"
    with err.open("wb") as out:
        run = subprocess.Popen(
            service_command("run", "--no-relay"), env=env, cwd=tmp_path,
            stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    try:
        await wait_until(lambda: "press Ctrl-C to stop" in err.read_text(), timeout=60)
        said = err.read_text()
        assert "configured endpoint notification from the settings: " in said
        assert "seeded endpoint trip from the settings: " in said
        assert set(await endpoint_rows(db)) == {"notification", "trip"}
    finally:
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=30) == 0
