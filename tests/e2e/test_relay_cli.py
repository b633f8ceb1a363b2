"""The relay's commands as a user runs them: notification-sink, relay metrics and housekeeping,
`payment-service relay` (`outbox stats | dead | replay`: tests/e2e/test_outbox_cli.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from outbox_relay.http import CallbackClient
from payment_service.callback_urls import NetworkPolicy
from payment_service.embedded import free_port
from payment_service.endpoints import select_endpoint, update_endpoint
from payment_service.signing import secret_key, sign
from tests.support.commands import module_command, service_command
from tests.support.database import insert_events, status_counts
from tests.support.environment import CALLBACK_PATH, SECRET, minimal_environment
from tests.support.processes import RelayLauncher
from tests.support.receiver import Receiver, answer_status
from tests.support.waiting import wait_until

LOCAL = NetworkPolicy(allow_loopback=True)  # the tests' receivers are on 127.0.0.1


class Sink:
    """`payment-service notification-sink` as a process; its stdout lines parsed."""

    def __init__(self, tmp_path: Path, *args: str, secret: str | None = SECRET) -> None:
        self.port = free_port()
        self.out = tmp_path / f"sink-{self.port}.out"
        env = minimal_environment()
        if secret:
            env["CALLBACK_SIGNING_SECRET"] = secret
        with self.out.open("wb") as out:
            self.process = subprocess.Popen(
                service_command("notification-sink", "--port", str(self.port), *args),
                env=env,
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lines(self) -> list[dict[str, Any]]:
        parsed = []
        for line in self.out.read_text().splitlines():
            record = json.loads(line, parse_float=Decimal)
            parsed.append(record)
        return parsed

    def callbacks(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if "webhook_id" in line]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)


@pytest.fixture
def sinks(tmp_path: Path) -> Iterator[list[Sink]]:
    started: list[Sink] = []
    yield started
    for sink in started:
        if sink.process.poll() is None:
            sink.process.kill()
            sink.process.wait(timeout=10)


def start_sink(sinks: list[Sink], tmp_path: Path, *args: str, secret: str | None = SECRET) -> Sink:
    sink = Sink(tmp_path, *args, secret=secret)
    sinks.append(sink)
    return sink


async def sink_ready(sink: Sink) -> None:
    await wait_until(
        lambda: any(line.get("msg") == "notification sink listening" for line in sink.lines()),
        timeout=30,
    )


async def test_the_notification_sink_verifies_dedupes_and_prints_each_event(
    tmp_path: Path, conn: asyncpg.Connection, relays: RelayLauncher, sinks: list[Sink]
) -> None:
    sink = start_sink(sinks, tmp_path)
    await sink_ready(sink)
    relay = relays.start(command=service_command("relay"), notification_service_url=sink.base_url)
    events = await insert_events(conn, payments=5)
    await wait_until(lambda: len(sink.callbacks()) >= 5, timeout=30)
    stored = {
        r["event_id"]: json.loads(r["payload"], parse_float=Decimal)
        for r in await conn.fetch("SELECT event_id::text, payload FROM outbox_events")
    }
    for line in sink.callbacks():
        assert (line["signature"], line["answered"], line["duplicate"]) == ("valid", 200, False)
        assert line["event"] == stored[line["webhook_id"]]  # amounts exact, not via float
    assert {line["webhook_id"] for line in sink.callbacks()} == {e.event_id for e in events}

    # The same callback again (a redelivery): answered 200 and marked as a duplicate.
    event_id = events[0].event_id
    body = json.dumps(stored[event_id], default=str).encode()
    client = CallbackClient(
        sink.base_url + CALLBACK_PATH,
        networks=LOCAL,
        max_connections=1,
        timeout=5,
        user_agent="test",
    )
    now = int(time.time())
    signed = [
        ("webhook-id", event_id),
        ("webhook-timestamp", str(now)),
        ("webhook-signature", sign(secret_key(SECRET), event_id, now, body)),
    ]
    assert (await client.post(body, signed)).status == 200
    forged = [*signed[:2], ("webhook-signature", "v1,bm90IGEgc2lnbmF0dXJl")]
    assert (await client.post(body, forged)).status == 401
    assert (await client.post(body, [])).status == 401
    await client.aclose()
    last_two = sink.callbacks()[-3:]
    assert [(x["answered"], x["duplicate"], x["signature"]) for x in last_two] == [
        (200, True, "valid"),
        (401, False, "invalid"),
        (401, False, "invalid"),
    ]
    async with httpx.AsyncClient(base_url=sink.base_url, trust_env=False) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.post("/elsewhere", content=b"{}")).status_code == 404
    relay.send(signal.SIGTERM)
    assert await relay.wait_exit(timeout=15) == 0
    assert sink.stop() == 0


async def test_the_sink_answers_errors_on_request_and_the_relay_retries(
    tmp_path: Path, conn: asyncpg.Connection, relays: RelayLauncher, sinks: list[Sink]
) -> None:
    sink = start_sink(sinks, tmp_path, "--fail-first", "2", secret=None)
    await sink_ready(sink)
    first = relays.start(
        notification_service_url=sink.base_url, callback_signing_secret="", relay_quick_retries=0
    )
    events = await insert_events(conn, payments=3)
    await wait_until(
        lambda: (
            {e.event_id for e in events}
            <= {x["webhook_id"] for x in sink.callbacks() if x["answered"] == 200}
        ),
        timeout=30,
    )
    answers = [x["answered"] for x in sink.callbacks()]
    assert answers[:2] == [500, 500] and answers.count(200) == 3
    assert {x["signature"] for x in sink.callbacks()} == {"not checked"}

    first.send(signal.SIGTERM)
    assert await first.wait_exit(timeout=15) == 0
    # A sink answering 410 Gone: its endpoint is DISABLED, the deliveries wait.
    gone = start_sink(sinks, tmp_path, "--status", "410", secret=None)
    await sink_ready(gone)
    await update_endpoint(conn, "notification", url=gone.base_url + CALLBACK_PATH)
    relays.start(callback_signing_secret="")
    more = await insert_events(conn, payments=2)

    async def disabled() -> bool:
        return (await select_endpoint(conn, "notification")).state == "DISABLED"

    await wait_until(disabled, timeout=30)
    assert {x["answered"] for x in gone.callbacks()} == {410}
    assert {x["webhook_id"] for x in gone.callbacks()} <= {e.event_id for e in more}
    assert await status_counts(conn) == {"DELIVERED": 3, "PENDING": 2}


async def test_relay_metrics_and_housekeeping(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    port = free_port()
    await conn.execute(
        """INSERT INTO idempotency_keys (key_hash, request_path, request_fingerprint,
                   response_status, response_data, expires_at)
           VALUES (repeat('a', 64), '/payments', repeat('f', 64), 200, '{}',
                   now() - interval '1 s'),
                  (repeat('b', 64), '/payments', repeat('f', 64), 200, '{}',
                   now() + interval '1 h')"""
    )
    receiver.policy = answer_status(400)
    relay = relays.start(
        relay_metrics_port=port,
        outbox_retention_hours=0,
        relay_housekeeping_interval=0.2,
        relay_max_attempts=1,
    )
    dead_events = await insert_events(conn, payments=2)

    async def is_dead() -> bool:
        return (await status_counts(conn)).get("DEAD", 0) == 2

    await wait_until(is_dead, timeout=30)
    receiver.policy = answer_status(200)
    delivered = await insert_events(conn, payments=5)
    await wait_until(lambda: {e.event_id for e in delivered} <= receiver.accepted_ids(), timeout=30)

    # Housekeeping (retention 0) deletes the delivered events and the expired key, nothing else.
    async def cleaned() -> bool:
        return await status_counts(conn) == {"DEAD": 2}

    await wait_until(cleaned, timeout=30)
    keys = [r[0] for r in await conn.fetch("SELECT key_hash FROM idempotency_keys")]
    assert keys == ["b" * 64]
    assert {r[0] for r in await conn.fetch("SELECT event_id::text FROM outbox_events")} == {
        e.event_id for e in dead_events
    }

    async with httpx.AsyncClient(trust_env=False) as http:

        async def metrics() -> str:
            return (await http.get(f"http://127.0.0.1:{port}/metrics")).text

        async def gauges_refreshed() -> bool:
            text = await metrics()
            return "outbox_dead_deliveries 2.0" in text and "outbox_pending_deliveries 0.0" in text

        await wait_until(gauges_refreshed, timeout=20, interval=0.5)
        text = await metrics()
    assert 'relay_deliveries_total{outcome="delivered"} 5.0' in text
    assert 'relay_deliveries_total{outcome="dead"} 2.0' in text
    assert "relay_delivery_duration_seconds_count 7.0" in text
    assert "relay_claimed_deliveries_total 7.0" in text  # one attempt each: max attempts 1
    assert "relay_event_delivery_lag_seconds_count 5.0" in text
    assert "outbox_oldest_pending_age_seconds 0.0" in text
    relay.send(signal.SIGTERM)
    assert await relay.wait_exit(timeout=15) == 0


def test_relay_help_says_it_delivers_to_every_endpoint(tmp_path: Path) -> None:
    """Both spellings of the relay describe what it does since subscriptions: every endpoint, not
    one service."""
    for command in (
        service_command("relay", "--help"),
        module_command("outbox_relay", "--help"),
    ):
        shown = subprocess.run(
            command, env=minimal_environment(), cwd=tmp_path, capture_output=True, text=True,
            timeout=30, check=True,
        ).stdout  # fmt: skip
        text = " ".join(shown.split())
        assert "every subscribed endpoint" in text, shown
        assert "Notification Service" not in text, shown
