"""Failover in compose, for real: deploy/failover/demo.py brings up a primary, a synchronous
streaming standby and the service (docker-compose.yml + deploy/failover/compose.yml), puts load on
the API with clients retrying by key, kills the primary with SIGKILL and promotes the standby.
This test runs the demo as a user would, then checks on the new primary, on its own: every
acknowledged payment and refund is there, one payment per key (and per trip), every event
delivered to every endpoint, `payment-service check` passes, the API and the relay were never
restarted, the old primary stayed down, and no answer was a 500.

Run with `COMPOSE_SMOKE=1 make test PYTEST_ARGS=tests/compose` (needs Docker and docker-compose).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.support import REPO_ROOT

DEMO = REPO_ROOT / "deploy" / "failover" / "demo.py"
DEMO_TIMEOUT_SECONDS = 1500  # a first build installs every dependency; a run takes ~1.5 min
COMMAND_TIMEOUT_SECONDS = 180
# What a client may see during a failover: never a 500.
ALLOWED_ANSWERS = {"200", "409", "503", "connection error"}

pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_SECONDS + 600)


def _demo(*args: str, timeout: float = DEMO_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _load_demo_module() -> Any:
    """The demo's own Stack (compose with both files, psql in a container), to look around."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("failover_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("failover_demo", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def failed_over(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The demo run to its end with the stack kept: (its exit, output, report, stack)."""
    directory = tmp_path_factory.mktemp("failover")
    project = f"paymentfailover{uuid.uuid4().hex[:8]}"
    env_file, report_file = directory / "demo.env", directory / "report.json"
    common = ("--project", project, "--env-file", str(env_file))
    try:
        result = _demo("run", *common, "--keep", "--report", str(report_file))
        output = result.stdout + result.stderr
        assert report_file.exists(), f"the demo wrote no report:\n{output[-6000:]}"
        report = json.loads(report_file.read_text(encoding="utf-8"))
        stack = _load_demo_module().Stack(project, env_file)
        yield result.returncode, output, report, stack
    finally:
        removed = _demo("down", *common, timeout=COMMAND_TIMEOUT_SECONDS)
        assert removed.returncode == 0, removed.stdout + removed.stderr
        leftovers = subprocess.run(
            [
                "docker",
                "volume",
                "ls",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={project}",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
        ).stdout
        assert leftovers.strip() == "", f"`down` left volumes behind: {leftovers}"


def test_the_demo_reports_success(failed_over: Any) -> None:
    returncode, output, report, _ = failed_over
    assert returncode == 0, f"{report.get('problems')}\n{output[-6000:]}"
    assert report["problems"] == []
    assert "nothing lost, nothing charged twice" in output


def test_no_500_only_2xx_409_503_or_refused_connections(failed_over: Any) -> None:
    _, _, report, stack = failed_over
    answers = report["answers_by_status"]
    assert int(answers.get("200", 0)) > 0, answers
    if set(answers) - ALLOWED_ANSWERS:
        api_log = stack.compose("logs", "--no-color", "api").stdout
        errors = [line for line in api_log.splitlines() if '"unhandled error"' in line]
        raise AssertionError(
            f"answers {answers}; the API's unhandled errors:\n" + "\n".join(errors)[-6000:]
        )
    # Every 503 told the client when to come back (the service sets Retry-After on each one; the
    # clients waited it out): 503s happened only around the switch, not after it.
    if report["last_503_after_kill_seconds"] is not None:
        assert report["last_503_after_kill_seconds"] <= report["back_after_kill_seconds"] + 1


def test_every_acknowledged_payment_and_refund_is_on_the_new_primary(failed_over: Any) -> None:
    _, _, report, stack = failed_over
    assert stack.sql("db-standby", "SELECT pg_is_in_recovery()") == ["f"]
    payments: dict[str, int] = report["payments"]
    refunds: dict[str, int] = report["refunds"]
    assert payments, "no payment was acknowledged"
    # key → its trip (the demo's keys end in the client's sequence number).
    trip_of = {key: report["trip_base"] + int(key.rsplit("-", 1)[1]) for key in payments}
    rows = stack.sql(
        "db-standby",
        "SELECT trip_id, payment_id FROM payments WHERE trip_id IN "
        f"({','.join(str(trip) for trip in trip_of.values())}) ORDER BY trip_id, payment_id",
    )
    by_trip: dict[int, list[int]] = {}
    for row in rows:
        trip, payment_id = (int(part) for part in row.split("|"))
        by_trip.setdefault(trip, []).append(payment_id)
    # Exactly the acknowledged payment for each key's trip: nothing lost, nothing charged twice.
    assert {key: by_trip.get(trip) for key, trip in trip_of.items()} == {
        key: [payment_id] for key, payment_id in payments.items()
    }
    found = stack.sql(
        "db-standby",
        "SELECT refund_id FROM payment_refunds WHERE refund_id IN "
        f"({','.join(str(i) for i in refunds.values()) or 'NULL'})",
    )
    assert sorted(int(i) for i in found) == sorted(refunds.values())
    # One payment per idempotency key among everything the clients sent (acknowledged or not).
    assert (
        stack.sql(
            "db-standby",
            f"SELECT idempotency_hash FROM payments WHERE trip_id >= {report['trip_base']} "
            "GROUP BY idempotency_hash HAVING count(*) > 1",
        )
        == []
    )


def test_every_event_delivered_to_every_endpoint(failed_over: Any) -> None:
    _, _, _, stack = failed_over
    counts = stack.sql(
        "db-standby",
        "SELECT (SELECT count(*) FROM outbox_events), "
        "(SELECT count(*) FROM deliveries WHERE status <> 'DELIVERED'), "
        "(SELECT count(*) FROM outbox_events e WHERE NOT EXISTS "
        "   (SELECT 1 FROM deliveries d WHERE d.event_id = e.id))",
    )
    events, undelivered, without_delivery = (int(part) for part in counts[0].split("|"))
    assert events > 0
    assert (undelivered, without_delivery) == (0, 0)


def test_check_passes_on_the_new_primary(failed_over: Any) -> None:
    _, _, _, stack = failed_over
    # Again, on its own: in a container of the service's image, through DB_HOST=db,db-standby.
    check = stack.run_check()
    assert check.returncode == 0, check.stdout + check.stderr
    assert "consistent" in check.stdout


def test_api_and_relay_never_restarted_and_the_old_primary_stayed_down(failed_over: Any) -> None:
    _, _, report, stack = failed_over
    for service in ("api", "relay"):
        state = stack.container_state(service)
        before = report["containers_before"][service]
        assert state["running"] and state["restart_count"] == 0, (service, state)
        assert (state["id"], state["started_at"]) == (before["id"], before["started_at"]), service
    assert stack.container_state("db")["running"] is False


def test_the_relay_waited_the_switch_out_without_a_crash(failed_over: Any) -> None:
    _, _, _, stack = failed_over
    relay_log = stack.compose("logs", "--no-color", "relay").stdout
    assert '"database reached"' in relay_log, relay_log[-3000:]
    # Losing the database is waited out ("database unavailable"), never a loop crash with a
    # traceback: asyncpg's InternalClientError on a pooled connection that got the dying server's
    # FATAL is a lost connection, as in the API.
    crashes = [line for line in relay_log.splitlines() if "relay loop crashed" in line]
    assert not crashes, "\n".join(crashes)[-6000:]
    assert "another relay owns it" not in relay_log
    # The demo's relay leases for 600 s, so every delivery DELIVERED (the demo waits 150 s) also
    # proves that no claim was stranded by the switch.
    lease = stack.compose("exec", "-T", "relay", "printenv", "RELAY_LEASE_SECONDS").stdout
    assert lease.strip() == "600", lease
