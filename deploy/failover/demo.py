#!/usr/bin/env python3
"""Fail the Payment Service's database over, under load, and show what the clients saw.

    python3 deploy/failover/demo.py            # up, load, kill, promote, report, check, down
    python3 deploy/failover/demo.py run --keep # the same, leaving the stack up to look at
    python3 deploy/failover/demo.py down       # remove a kept stack and its volumes

`run` starts docker-compose.yml with deploy/failover/compose.yml (a primary `db`, a synchronous
streaming standby `db-standby`, the API, the relay and two stand-in receivers) under its own
project name, on free ports of 127.0.0.1; starts clients that create payments (and refund some),
each retrying the same request with its Idempotency-Key on 409, 503 and connection errors; kills
the primary with SIGKILL; promotes the standby with `SELECT pg_promote()`; waits for the API to
answer 2xx again; then prints the answers by status, how long the API answered 503, whether any 500
was seen, and checks on the new primary that every acknowledged payment and refund is there, one
payment per key, every event delivered, `payment-service check` passes and neither the API nor
the relay was restarted. It exits 0 when all of that holds, 1 otherwise.

Needs only Docker with docker-compose (or `docker compose`) and Python 3.11+ (standard library
only). POSTGRES_IMAGE, PYTHON_IMAGE and PAYMENT_SERVICE_IMAGE choose the images, as for
docker-compose.yml. The stack's settings (a random DB_PASS, the ports) are kept in --env-file
(mode 0600, made on first use) so that a kept stack can be looked at and removed later.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = (REPO_ROOT / "docker-compose.yml", REPO_ROOT / "deploy/failover/compose.yml")
DEFAULT_ENV_FILE = REPO_ROOT / "deploy/failover/demo.env"
DEFAULT_PROJECT = "payfailover"
# Ports the stack publishes on 127.0.0.1, chosen free when the env file is made.
PUBLISHED_PORTS = (
    "SERVICE_PORT",
    "NOTIFICATION_SINK_PORT",
    "TRIP_SINK_PORT",
    "DB_PUBLISHED_PORT",
    "DB_STANDBY_PUBLISHED_PORT",
)
STANDBY_NAME = "standby"  # its cluster_name, the name synchronous_standby_names waits for
REQUEST_TIMEOUT_SECONDS = 10.0
RETRY_WAIT_CAP_SECONDS = 1.0  # a client waits Retry-After, at most this long, before retrying
CONNECTION_RETRY_SECONDS = 0.2
UP_TIMEOUT_SECONDS = 900  # the first build installs every dependency
READY_TIMEOUT_SECONDS = 180
# Every delivery must be DELIVERED within this after the load; the relay's lease in the demo is
# RELAY_LEASE_SECONDS, far longer, so a claim stranded by the switch fails the demo rather than
# going out once its lease runs out. A healthy relay drains within a second or two.
DELIVERY_TIMEOUT_SECONDS = 150
RELAY_LEASE_SECONDS = 600
CHECK_TIMEOUT_SECONDS = 180
REFUND_EVERY = 3  # one payment in three is refunded 1.00 right after it is acknowledged


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def compose_command() -> list[str]:
    if configured := os.environ.get("COMPOSE"):
        return shlex.split(configured)
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[name.strip()] = value.strip()
    return values


def make_env_file(path: Path) -> None:
    """.env.example with a random password and free ports: a throw-away stack's settings."""
    example = (REPO_ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
    lines = [
        *(line for line in example if not line.startswith("RELAY_LEASE_SECONDS=")),
        "",
        "# deploy/failover/demo.py: this demo's own stack",
        "PUBLISH_HOST=127.0.0.1",
    ]
    lines += [f"{name}={free_port()}" for name in PUBLISHED_PORTS]
    lines.append(f"DB_PASS={secrets.token_urlsafe(24)}")
    # The compose file's gateway signs its webhooks with this. The demo measures the database's
    # failover: its payments are recorded without a gateway, as they were when it was measured.
    lines.append(f"STRIPE_WEBHOOK_SECRET=whsec_{secrets.token_urlsafe(24)}")
    lines.append("GATEWAY=none")
    # A lease far longer than the wait for deliveries: a claim the switch left stranded (its
    # leases neither used nor released) then fails the demo instead of hiding behind a 30 s lease.
    lines.append(f"RELAY_LEASE_SECONDS={RELAY_LEASE_SECONDS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")


class CommandFailed(Exception):
    pass


@dataclass
class Stack:
    project: str
    env_file: Path
    compose_cmd: list[str] = field(default_factory=compose_command)

    def __post_init__(self) -> None:
        # The service's own settings come from the env file, never from this shell (compose lets
        # the shell win over --env-file): names listed in .env.example are left out.
        example = (REPO_ROOT / ".env.example").read_text(encoding="utf-8")
        names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
        names |= {"PUBLISH_HOST", *PUBLISHED_PORTS}
        self.env = {k: v for k, v in os.environ.items() if k not in names}
        self.settings = read_env_file(self.env_file)
        self.db_user = self.settings.get("DB_USER") or "postgres"

    def compose_args(self, *args: str) -> list[str]:
        files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path.relative_to(REPO_ROOT)))]
        return [
            *self.compose_cmd,
            *files,
            "-p",
            self.project,
            "--env-file",
            os.path.relpath(self.env_file, REPO_ROOT),
            *args,
        ]

    def compose(
        self, *args: str, timeout: float = 120, show: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = self.compose_args(*args)
        if show:
            log(f"$ {shlex.join(command)}")
        try:
            result = subprocess.run(
                command,
                cwd=REPO_ROOT,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"`{shlex.join(command)}` did not finish in {timeout} s") from None
        if check and result.returncode != 0:
            raise CommandFailed(
                f"`{shlex.join(command)}` exited {result.returncode}:\n"
                f"{(result.stdout + result.stderr)[-3000:]}"
            )
        return result

    def sql(self, service: str, query: str, *, show: bool = False) -> list[str]:
        """Rows of `query` run by psql inside `service`'s container (its trusted socket)."""
        result = self.compose(
            "exec",
            "-T",
            service,
            "psql",
            "-U",
            self.db_user,
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-tAc",
            query,
            show=show,
        )
        return [line for line in result.stdout.splitlines() if line]

    def run_check(self, *, show: bool = False) -> subprocess.CompletedProcess[str]:
        """`payment-service check` in a new container of the service's image: through
        DB_HOST=db,db-standby it finds whichever is the primary."""
        return self.compose(
            "run", "--rm", "--no-deps", "-T", "migrate", "payment-service", "check",
            timeout=CHECK_TIMEOUT_SECONDS, show=show, check=False,
        )  # fmt: skip

    def container_state(self, service: str) -> dict[str, Any]:
        container = self.compose("ps", "-q", service).stdout.strip()
        if not container:
            return {"id": None}
        state = subprocess.run(
            [
                "docker",
                "inspect",
                "-f",
                '{"id": "{{.Id}}", "restart_count": {{.RestartCount}}, '
                '"started_at": "{{.State.StartedAt}}", "running": {{.State.Running}}}',
                container,
            ],
            capture_output=True,
            text=True,
            check=True,
            env=self.env,
            timeout=60,
        ).stdout
        result: dict[str, Any] = json.loads(state)
        return result

    @property
    def api_port(self) -> int:
        return int(self.settings.get("SERVICE_PORT") or 8082)


def wait_for(what: str, predicate: Any, timeout: float, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except CommandFailed:
            pass
        if time.monotonic() >= deadline:
            raise CommandFailed(f"{what}: not within {timeout} s")
        time.sleep(interval)


def http_status(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


# --- the clients ---------------------------------------------------------------------------------


@dataclass
class Answer:
    at: float  # time.monotonic()
    status: int | None  # None: the connection failed or timed out
    operation: str


@dataclass
class Load:
    port: int
    clients: int
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    trip_base: int = field(default_factory=lambda: 10_000_000 + secrets.randbelow(10**9))
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[Answer] = field(default_factory=list)
    payments: dict[str, int] = field(default_factory=dict)  # acknowledged: key -> payment_id
    refunds: dict[str, int] = field(default_factory=dict)  # acknowledged: key -> refund_id
    refused: list[str] = field(default_factory=list)  # definitive 4xx other than 409
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def send(self, operation: str, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST until a definitive answer (2xx or a 4xx other than 409), retrying with the same
        key; None when the load was stopped first."""
        payload = json.dumps(body)
        while not self.stop.is_set():
            conn = http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_SECONDS
            )
            try:
                conn.request("POST", path, payload, {"Content-Type": "application/json"})
                response = conn.getresponse()
                status, text = response.status, response.read()
                retry_after = response.getheader("Retry-After")
            except (OSError, http.client.HTTPException):
                status, text, retry_after = None, b"", None
            finally:
                conn.close()
            with self.lock:
                self.answers.append(Answer(time.monotonic(), status, operation))
            if status is not None and 200 <= status < 300:
                result: dict[str, Any] = json.loads(text)
                return result
            if status is None:
                self.stop.wait(CONNECTION_RETRY_SECONDS)
            elif status in (409, 503) or status >= 500:
                # A 5xx stores nothing, so the same request again is safe (and a 500 is counted).
                wait = float(retry_after) if retry_after and retry_after.isdigit() else 1.0
                self.stop.wait(min(wait, RETRY_WAIT_CAP_SECONDS))
            else:
                with self.lock:
                    self.refused.append(f"{operation} {status}: {text[:200]!r}")
                return None
        return None

    def client(self) -> None:
        while not self.stop.is_set():
            number = next(self.counter)
            key = f"failover-{self.run_id}-pay-{number}"
            body = {
                "idempotency_key": key,
                "trip_id": self.trip_base + number,
                "method": "CARD",
                "amount": "12.34",
            }
            payment = self.send("payment", "/payments", body)
            if payment is None:
                continue
            with self.lock:
                self.payments[key] = int(payment["payment_id"])
            if number % REFUND_EVERY == 0:
                refund_key = f"failover-{self.run_id}-refund-{number}"
                refund = self.send(
                    "refund",
                    f"/payments/{payment['payment_id']}/refunds",
                    {"idempotency_key": refund_key, "amount": "1.00"},
                )
                if refund is not None:
                    with self.lock:
                        self.refunds[refund_key] = int(refund["refund_id"])

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.client, daemon=True) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        return threads

    def first_success_after(self, moment: float) -> float | None:
        with self.lock:
            times = [a.at for a in self.answers if a.at > moment and a.status and a.status < 300]
        return min(times, default=None)


# --- the demonstration ---------------------------------------------------------------------------


def bring_up(stack: Stack, build: bool) -> None:
    log(f"starting project {stack.project} (primary, synchronous standby, API, relay, sinks)")
    stack.compose(
        "up", "-d", *(["--build"] if build else []), timeout=UP_TIMEOUT_SECONDS, show=True
    )
    wait_for(
        "GET /health answering 200",
        lambda: http_status(stack.api_port, "/health") == 200,
        READY_TIMEOUT_SECONDS,
    )
    wait_for(
        f'"{STANDBY_NAME}" the synchronous standby of db',
        lambda: (
            stack.sql(
                "db",
                "SELECT sync_state FROM pg_stat_replication "
                f"WHERE application_name = '{STANDBY_NAME}'",
            )
            == ["sync"]
        ),
        READY_TIMEOUT_SECONDS,
    )
    log(f"up: API on http://127.0.0.1:{stack.api_port}, db-standby streaming, synchronous")


def run(args: argparse.Namespace) -> int:
    if not args.env_file.exists():
        make_env_file(args.env_file)
        log(f"made {os.path.relpath(args.env_file)} (a random DB_PASS, free ports; mode 0600)")
    stack = Stack(args.project, args.env_file)
    report: dict[str, Any] = {"project": stack.project}
    try:
        return demonstrate(stack, args, report)
    finally:
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if not args.keep:
            tear_down(stack)
        else:
            again = ["python3", "deploy/failover/demo.py", "down"]
            if args.project != DEFAULT_PROJECT:
                again += ["-p", args.project]
            if args.env_file != DEFAULT_ENV_FILE:
                again += ["--env-file", str(args.env_file)]
            log(f"kept; remove it with: {shlex.join(again)}")


def demonstrate(stack: Stack, args: argparse.Namespace, report: dict[str, Any]) -> int:
    bring_up(stack, build=not args.no_build)
    before = {service: stack.container_state(service) for service in ("api", "relay")}
    report["containers_before"] = before

    load = Load(stack.api_port, args.clients)
    log(f"load: {args.clients} clients creating payments (and refunding one in {REFUND_EVERY})")
    started = time.monotonic()
    threads = load.start()
    load.stop.wait(args.kill_after)

    stack.compose("kill", "-s", "SIGKILL", "db", show=True)
    kill_at = time.monotonic()  # the primary is dead once `kill` returns; times count from here
    log(f"primary killed {kill_at - started:.1f} s into the load")
    load.stop.wait(args.promote_after)  # a failover manager's detection time, here a fixed pause
    stack.sql("db-standby", "SELECT pg_promote()", show=True)
    promote_at = time.monotonic()
    log(f"db-standby promoted {promote_at - kill_at:.1f} s after the kill")

    # Only the promoted standby can commit, so the first 2xx answered after the promotion is the
    # service back (an answer completed while `kill` ran may still come from the old primary).
    deadline = kill_at + args.max_seconds
    while load.first_success_after(promote_at) is None and time.monotonic() < deadline:
        load.stop.wait(0.2)
    back = load.first_success_after(promote_at)
    if back is not None:
        log(f"the API answers 2xx again, {back - kill_at:.1f} s after the kill")
        load.stop.wait(max(0.0, min(args.load_after, deadline - time.monotonic())))
    load.stop.set()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_SECONDS + 5)
    stopped = time.monotonic()

    answers = list(load.answers)
    by_status = collections.Counter(
        "connection error" if a.status is None else str(a.status) for a in answers
    )
    unavailable = [a.at for a in answers if a.status == 503]
    failed = [a.at for a in answers if a.status is None]
    errors_500 = [
        a for a in answers if a.status is not None and a.status >= 500 and a.status != 503
    ]
    report.update(
        answers_by_status=dict(sorted(by_status.items())),
        load_seconds=round(stopped - started, 1),
        killed_after_seconds=round(kill_at - started, 1),
        promoted_after_kill_seconds=round(promote_at - kill_at, 1),
        back_after_kill_seconds=None if back is None else round(back - kill_at, 1),
        seconds_of_503=round(max(unavailable) - min(unavailable), 1) if unavailable else 0.0,
        first_503_after_kill_seconds=round(min(unavailable) - kill_at, 1) if unavailable else None,
        last_503_after_kill_seconds=round(max(unavailable) - kill_at, 1) if unavailable else None,
        connection_errors=len(failed),
        answers_5xx_other_than_503=len(errors_500),
        refused=load.refused,
        payments=load.payments,
        refunds=load.refunds,
        trip_base=load.trip_base,
    )
    print()
    log("answers by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())))
    if unavailable:
        log(
            f"503 answered from {min(unavailable) - kill_at:+.1f} s to "
            f"{max(unavailable) - kill_at:+.1f} s after the kill: {report['seconds_of_503']} s"
        )
    else:
        log("no 503 answered")
    log(f"500s (or other 5xx): {len(errors_500)}" + (" — SEEN" if errors_500 else " — none"))
    log(f"acknowledged: {len(load.payments)} payments, {len(load.refunds)} refunds")

    problems = verify(stack, load, report, before)
    if errors_500:
        problems.append(f"{len(errors_500)} answers were 5xx other than 503")
        # What the API logged for them, before the stack (and its logs) go.
        api_log = stack.compose("logs", "--no-color", "api").stdout.splitlines()
        report["api_unhandled_errors"] = [line for line in api_log if '"unhandled error"' in line]
        for line in report["api_unhandled_errors"]:
            log("the API logged: " + line.rsplit("\\n", 1)[-1][:300])
    if back is None:
        problems.append(f"the API did not answer 2xx within {args.max_seconds} s of the kill")
    if load.refused:
        problems.append(f"{len(load.refused)} requests were refused: {load.refused[:3]}")
    report["problems"] = problems
    print()
    if problems:
        for problem in problems:
            log(f"PROBLEM: {problem}")
        return 1
    log("nothing lost, nothing charged twice, every event delivered, check passed, no restarts")
    return 0


def verify(
    stack: Stack, load: Load, report: dict[str, Any], before: dict[str, dict[str, Any]]
) -> list[str]:
    """Checks on the new primary; the list of what failed."""
    problems = []
    primary = "db-standby"
    if stack.sql(primary, "SELECT pg_is_in_recovery()") != ["f"]:
        problems.append("db-standby is not a primary")

    ids = ",".join(str(i) for i in load.payments.values()) or "NULL"
    found = {
        int(r)
        for r in stack.sql(primary, f"SELECT payment_id FROM payments WHERE payment_id IN ({ids})")
    }
    lost = sorted(set(load.payments.values()) - found)
    refund_ids = ",".join(str(i) for i in load.refunds.values()) or "NULL"
    found_refunds = {
        int(r)
        for r in stack.sql(
            primary, f"SELECT refund_id FROM payment_refunds WHERE refund_id IN ({refund_ids})"
        )
    }
    lost_refunds = sorted(set(load.refunds.values()) - found_refunds)
    trips = f"trip_id >= {load.trip_base}"
    twice = stack.sql(
        primary, f"SELECT trip_id FROM payments WHERE {trips} GROUP BY trip_id HAVING count(*) > 1"
    )
    per_key = stack.sql(
        primary,
        f"SELECT idempotency_hash FROM payments WHERE {trips} "
        "GROUP BY idempotency_hash HAVING count(*) > 1",
    )
    report.update(lost_payments=lost, lost_refunds=lost_refunds, charged_twice=twice + per_key)
    log(
        f"on the new primary: {len(found)} of {len(load.payments)} acknowledged payments, "
        f"{len(found_refunds)} of {len(load.refunds)} refunds; "
        f"charged twice: {len(twice + per_key)}"
    )
    if lost or lost_refunds:
        problems.append(f"lost: payments {lost[:10]}, refunds {lost_refunds[:10]}")
    if twice or per_key:
        problems.append(f"more than one payment for a trip or key: {(twice + per_key)[:10]}")

    def all_delivered() -> bool:
        return stack.sql(
            primary, "SELECT count(*) FROM deliveries WHERE status <> 'DELIVERED'"
        ) == ["0"]

    waited = time.monotonic()
    try:
        wait_for("every delivery DELIVERED", all_delivered, DELIVERY_TIMEOUT_SECONDS)
        report["delivered_after_seconds"] = round(time.monotonic() - waited, 1)
        counts = stack.sql(primary, "SELECT count(*) FROM deliveries")
        log(
            f"every delivery DELIVERED ({counts[0]}), "
            f"{report['delivered_after_seconds']} s after the load"
        )
    except CommandFailed as error:
        pending = stack.sql(primary, "SELECT status, count(*) FROM deliveries GROUP BY status")
        problems.append(f"{error} ({pending})")

    check = stack.run_check(show=True)
    report["check_exit"] = check.returncode
    report["check_output"] = (check.stdout + check.stderr)[-3000:]
    log(f"payment-service check exited {check.returncode}: {check.stdout.strip()[-300:]}")
    if check.returncode != 0:
        problems.append(f"payment-service check exited {check.returncode}")

    # Killed, it stays down (compose's restart policy does not restart a killed container): were
    # it to come back as a primary beside the promoted one, that would be split-brain.
    if stack.container_state("db").get("running"):
        problems.append("the old primary `db` is running again")

    after = {service: stack.container_state(service) for service in ("api", "relay")}
    report["containers_after"] = after
    for service, state in after.items():
        if state != before[service] or state["restart_count"] != 0 or not state["running"]:
            problems.append(f"{service} was restarted: before {before[service]}, after {state}")
    log(
        "api and relay: "
        + ", ".join(
            f"{s} restarts {after[s]['restart_count']}, started {after[s]['started_at']}"
            for s in after
        )
    )
    return problems


def tear_down(stack: Stack) -> None:
    stack.compose("down", "--volumes", "--remove-orphans", timeout=300, show=True)


def down(args: argparse.Namespace) -> int:
    if not args.env_file.exists():
        log(f"{os.path.relpath(args.env_file)} does not exist: nothing to remove")
        return 0
    tear_down(Stack(args.project, args.env_file))
    args.env_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fail the Payment Service's database over under load, and report.",
        epilog="See docs/operations.md §5.1.",
    )
    commands = parser.add_subparsers(dest="command")
    run_parser = commands.add_parser("run", help="the whole demonstration (the default)")
    down_parser = commands.add_parser("down", help="remove a stack kept with run --keep")
    for sub in (parser, run_parser, down_parser):
        sub.add_argument(
            "-p",
            "--project",
            default=DEFAULT_PROJECT,
            help=f"compose project name (default {DEFAULT_PROJECT})",
        )
        sub.add_argument(
            "--env-file",
            type=Path,
            default=DEFAULT_ENV_FILE,
            help="the stack's settings; made with a random DB_PASS and free ports "
            "if missing (default deploy/failover/demo.env)",
        )
    for sub in (parser, run_parser):
        sub.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
        sub.add_argument(
            "--kill-after",
            type=float,
            default=10,
            help="seconds of load before the primary is killed (default 10)",
        )
        sub.add_argument(
            "--promote-after",
            type=float,
            default=2,
            help="seconds between the kill and the promotion (default 2)",
        )
        sub.add_argument(
            "--load-after",
            type=float,
            default=5,
            help="seconds of load once the API answers 2xx again (default 5)",
        )
        sub.add_argument(
            "--max-seconds",
            type=float,
            default=60,
            help="give up if the API is not back this long after the kill (default 60)",
        )
        sub.add_argument("--keep", action="store_true", help="leave the stack up at the end")
        sub.add_argument("--no-build", action="store_true", help="do not build the image")
        sub.add_argument("--report", help="also write the figures and ids as JSON to this file")
    args = parser.parse_args(argv)
    try:
        return down(args) if args.command == "down" else run(args)
    except CommandFailed as error:
        log(f"FAILED: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
