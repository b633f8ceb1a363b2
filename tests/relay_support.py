"""Support for the relay tests: a recording receiver on 127.0.0.1, relay processes, test events.

- `Receiver` is a real HTTP server (the notification sink's `HttpServer`) in the test's event
  loop. It records every request it gets, in arrival order, and answers by its `policy`, which a
  test swaps at will (fail, hang, drop the connection). `stop_listening()` / `listen_again()` make
  it refuse connections for a while, on the same port.
- `RelayProcess` runs `python -m outbox_relay` (or `payment-service relay`) as a real subprocess
  with a clean environment, logging JSON lines to a file, stopped with real signals by PID.
- `insert_events` writes payments and their outbox events straight into the database, the way
  the API's transactions do (payload = `payment_event_json`, then NOTIFY).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from standardwebhooks import Webhook

from payment_cli.sink import HttpRequest, HttpResponse, HttpServer

# A signing secret for tests only (Standard Webhooks format).
SECRET = "whsec_" + base64.b64encode(b"relay-tests-only-signing-key-32b").decode()
CALLBACK_PATH = "/notifications"

OK = HttpResponse(200, b'{"ok": true}')


@dataclass
class Delivery:
    """One request the receiver got."""

    seq: int
    webhook_id: str
    headers: dict[str, str]
    body: bytes
    arrived: float  # time.monotonic()
    status: int | None = None  # what was answered; None while pending or when dropped

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    def verify(self, secret: str = SECRET) -> dict[str, Any]:
        """Check the signature with the `standardwebhooks` package; the parsed payload."""
        return Webhook(secret).verify(self.body, self.headers)  # type: ignore[no-any-return]


Policy = Callable[[Delivery], Awaitable[HttpResponse | None]]


async def answer_ok(_delivery: Delivery) -> HttpResponse:
    return OK


def answer_status(status: int, headers: tuple[tuple[str, str], ...] = ()) -> Policy:
    async def policy(_delivery: Delivery) -> HttpResponse:
        return HttpResponse(status, b'{"error": "test"}', headers)

    return policy


class Receiver:
    """A recording HTTP receiver; `policy` decides each answer."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.policy: Policy = answer_ok
        self._server = HttpServer(self._handle)

    async def start(self) -> Receiver:
        await self._server.start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}"

    async def _handle(self, request: HttpRequest) -> HttpResponse | None:
        if request.path != CALLBACK_PATH or request.method != "POST":
            return HttpResponse(404)
        delivery = Delivery(
            seq=len(self.deliveries),
            webhook_id=request.headers.get("webhook-id", ""),
            headers=request.headers,
            body=request.body,
            arrived=time.monotonic(),
        )
        self.deliveries.append(delivery)
        response = await self.policy(delivery)
        delivery.status = None if response is None else response.status
        return response

    async def stop_listening(self) -> None:
        """Close the port and every open connection: the relay's connects are refused."""
        await self._server.close()

    async def listen_again(self) -> None:
        await self._server.start()

    async def close(self) -> None:
        await self._server.close()

    # -- what arrived ---------------------------------------------------------------------------
    def accepted(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.status is not None and 200 <= d.status < 300]

    def accepted_ids(self) -> set[str]:
        return {d.webhook_id for d in self.accepted()}

    def accepted_counts(self) -> Counter[str]:
        return Counter(d.webhook_id for d in self.accepted())

    def requests_for(self, webhook_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.webhook_id == webhook_id]


# -- relay processes ------------------------------------------------------------------------------
def relay_env(database_url: str, receiver_url: str, **overrides: object) -> dict[str, str]:
    """A clean environment for a relay process: nothing inherited that Settings would read."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "ENVIRONMENT": "test",
        "LOG_LEVEL": "INFO",
        "DATABASE_URL": database_url,
        "NOTIFICATION_SERVICE_URL": receiver_url,
        "NOTIFICATION_CALLBACK_PATH": CALLBACK_PATH,
        "CALLBACK_SIGNING_SECRET": SECRET,
        "RELAY_METRICS_PORT": "0",
        "RELAY_METRICS_HOST": "127.0.0.1",
        "RELAY_POLL_INTERVAL": "0.2",
        "RELAY_REQUEST_TIMEOUT": "2",
        "RELAY_RETRY_SCHEDULE": "0.2",
        "RELAY_QUICK_RETRIES": "1",
        "RELAY_QUICK_RETRY_WAIT": "0.02",
        "RELAY_SHUTDOWN_GRACE_SECONDS": "5",
        "RELAY_HOUSEKEEPING_INTERVAL": "3600",
    }
    env.update({key.upper(): str(value) for key, value in overrides.items()})
    return env


@dataclass
class RelayProcess:
    """A relay running as a real process."""

    env: dict[str, str]
    log_path: Path
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "outbox_relay"])
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.log_path.parent,  # no developer .env is read
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def send(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code; fails if the process is still running after `timeout` seconds."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"relay {self.pid} still running after {timeout} s")
            await asyncio.sleep(0.02)
        return code

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"msg": line, "level": "RAW"})
        return records

    def logged(self, message: str) -> int:
        return sum(1 for record in self.log_records() if record.get("msg") == message)

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class RelayLauncher:
    """Starts relay processes for one test and kills any left running at its end."""

    def __init__(self, tmp_path: Path, database_url: str, receiver: Receiver) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.receiver = receiver
        self.started: list[RelayProcess] = []

    def start(self, *, command: list[str] | None = None, **overrides: object) -> RelayProcess:
        env = relay_env(self.database_url, self.receiver.base_url, **overrides)
        log_path = self.tmp_path / f"relay-{len(self.started)}.log"
        relay = RelayProcess(env, log_path)
        if command is not None:
            relay.command = command
        self.started.append(relay.start())
        return relay

    def stop_all(self) -> None:
        for relay in self.started:
            relay.ensure_stopped()


def payment_service_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "payment-service"), *args]


def outbox_command(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `payment-service outbox ARGS…` against a database; the finished process."""
    return subprocess.run(
        payment_service_command("outbox", *args),
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


def dump_logs(relays: list[RelayProcess], limit: int = 40) -> str:
    """The last log lines of each relay, for an assertion message."""
    parts = []
    for relay in relays:
        lines = relay.log_path.read_text(errors="replace").splitlines()[-limit:]
        parts.append(f"--- {relay.log_path.name} (pid {relay.pid})\n" + "\n".join(lines))
    return "\n".join(parts)


# -- events ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EventRow:
    id: int
    event_id: str
    payment_id: int
    seq: int  # position among its payment's events, from 1


async def insert_events(
    conn: asyncpg.Connection, *, payments: int, events_per_payment: int = 1
) -> list[EventRow]:
    """Insert `payments` payments with `events_per_payment` outbox events each, then NOTIFY.

    A payment's events get increasing ids in the order they are to be delivered.
    """
    rows = await conn.fetch(
        """
        WITH base AS (
            SELECT coalesce(max(trip_id), 0) AS trip FROM payments
        ), p AS (
            INSERT INTO payments (trip_id, amount, currency, method, status, reference,
                                  idempotency_hash)
            SELECT base.trip + g, 100.00 + g, 'INR', 'CARD', 'SUCCESS',
                   'PAY-TEST-' || (base.trip + g),
                   encode(sha256(convert_to((base.trip + g)::text, 'UTF8')), 'hex')
              FROM base, generate_series(1, $1) AS g
         RETURNING payments
        ), e AS MATERIALIZED (
            SELECT gen_random_uuid() AS event_id, p.payments AS payment, s.seq
              FROM p CROSS JOIN generate_series(1, $2) AS s(seq)
        ), inserted AS (
            INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
            SELECT e.event_id,
                   CASE WHEN e.seq = 1 THEN 'payment.succeeded' ELSE 'payment.refunded' END,
                   (e.payment).payment_id,
                   payment_event_json(e.payment, e.event_id,
                       CASE WHEN e.seq = 1 THEN 'payment.succeeded' ELSE 'payment.refunded' END)
                   || jsonb_build_object('seq', e.seq)
              FROM e
             ORDER BY (e.payment).payment_id, e.seq
         RETURNING id, event_id, aggregate_id, (payload ->> 'seq')::int AS seq
        )
        SELECT id, event_id::text, aggregate_id, seq FROM inserted ORDER BY id
        """,
        payments,
        events_per_payment,
    )
    await conn.execute("SELECT pg_notify('outbox_events', '')")
    return [EventRow(r["id"], r["event_id"], r["aggregate_id"], r["seq"]) for r in rows]


async def status_counts(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT status, count(*) AS n FROM outbox_events GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


async def claims_outstanding(conn: asyncpg.Connection) -> int:
    return await conn.fetchval(  # type: ignore[no-any-return]
        "SELECT count(*) FROM outbox_events WHERE claim_token IS NOT NULL"
        " OR locked_until IS NOT NULL"
    )


def assert_ordered_per_payment(receiver: Receiver, events: list[EventRow]) -> None:
    """No request for a payment's event arrived before the previous event was accepted."""
    by_id = {e.event_id: e for e in events}
    first_request: dict[str, int] = {}
    accepted_at: dict[str, int] = {}
    for d in receiver.deliveries:
        first_request.setdefault(d.webhook_id, d.seq)
        if d.status is not None and 200 <= d.status < 300:
            accepted_at.setdefault(d.webhook_id, d.seq)
    chains: dict[int, list[EventRow]] = {}
    for event in sorted(events, key=lambda e: e.id):
        chains.setdefault(event.payment_id, []).append(event)
    for payment_id, chain in chains.items():
        for earlier, later in itertools.pairwise(chain):
            assert earlier.event_id in accepted_at, f"payment {payment_id}: {earlier} not accepted"
            assert first_request[later.event_id] > accepted_at[earlier.event_id], (
                f"payment {payment_id}: event seq {later.seq} was sent before seq {earlier.seq} "
                "was accepted"
            )
    assert set(by_id) <= set(first_request)


# -- fixtures: a test module imports the `*_fixture` functions; its tests ask for the names
@pytest.fixture(name="receiver")
async def receiver_fixture() -> AsyncIterator[Receiver]:
    """A recording receiver on 127.0.0.1 that answers 200 until told otherwise."""
    server = await Receiver().start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture(name="relays")
def relays_fixture(
    tmp_path: Path, database_url: str, receiver: Receiver
) -> Iterator[RelayLauncher]:
    """Starts relay processes against this test's database and receiver; kills leftovers."""
    launcher = RelayLauncher(tmp_path, database_url, receiver)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture(name="conn")
async def conn_fixture(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database, set up as the relay's are (jsonb as text)."""
    from payment_service.database import connect

    connection = await connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()
