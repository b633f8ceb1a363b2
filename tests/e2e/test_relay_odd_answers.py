"""A receiver's answer, however odd, costs only that delivery an attempt (DESIGN §8).

A real relay process delivers to a misbehaving receiver on 127.0.0.1: the first request of each
event gets one kind of odd answer (NUL bytes in the body, status 999 or 099, broken or endless
chunked encodings, an endless body, a line that is not HTTP), every later request a plain 200.
With quick retries off, each odd answer is one recorded failed attempt; every event ends
DELIVERED, and no event the receiver acknowledged with a 2xx is sent again (a result the relay
failed to record would come back when its lease runs out).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.helpers import wait_until
from tests.relay_support import (  # noqa: F401 - fixture
    RelayProcess,
    conn_fixture,
    dump_logs,
    insert_events,
    relay_env,
    status_counts,
)

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
CHUNKED_200 = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
# kind -> (first bytes of the answer, bytes then written over and over until the relay hangs up)
ODD_ANSWERS: dict[str, tuple[bytes, bytes]] = {
    "nul-bytes-in-body": (b"HTTP/1.1 500 Oops\r\ncontent-length: 9\r\n\r\nbad\x00\x00body", b""),
    "status-999": (b"HTTP/1.1 999 Odd\r\ncontent-length: 0\r\n\r\n", b""),
    "status-099": (b"HTTP/1.1 099 x\r\ncontent-length: 0\r\n\r\n", b""),
    "chunk-size-line-too-long": (CHUNKED_200 + b"1" * (80 * 1024), b""),
    "negative-chunk-size": (CHUNKED_200 + b"-5\r\nabc\r\n0\r\n\r\n", b""),
    "garbage-chunk-size": (CHUNKED_200 + b"zz\r\nabc\r\n0\r\n\r\n", b""),
    "chunked-without-end": (CHUNKED_200, b"400\r\n" + b"x" * 0x400 + b"\r\n"),
    "no-length-without-end": (b"HTTP/1.1 200 OK\r\n\r\n", b"y" * 4096),
    "not-http": (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b""),
}
KINDS = ["ok", *ODD_ANSWERS]  # "ok": a plain 200 at once, in the same batches as the odd ones
DEADLINE_SECONDS = 60  # generous: the old relay never got there; it re-sent events for ever


class OddReceiver:
    """Answers each event's first request by its planned kind, every later one with a 200."""

    def __init__(self, plan: dict[str, str]) -> None:
        self.plan = plan
        self.answers: dict[str, list[str]] = defaultdict(list)  # event_id -> kinds, in order
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def acknowledged(self) -> set[str]:
        return {event_id for event_id, kinds in self.answers.items() if "ok" in kinds}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                event_id = json.loads(await reader.readexactly(length))["event_id"]
                sent = self.answers[event_id]
                kind = self.plan[event_id] if not sent else "ok"
                sent.append(kind)
                if kind == "ok":
                    writer.write(OK)
                    await writer.drain()
                    continue  # kept alive
                first, again = ODD_ANSWERS[kind]
                writer.write(first)
                await writer.drain()
                while again:  # until the relay hangs up: a reset ends it
                    writer.write(again)
                    await writer.drain()
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def receiver_and_events(
    conn: asyncpg.Connection,
) -> AsyncIterator[tuple[OddReceiver, str, dict[str, str]]]:
    events = await insert_events(conn, payments=len(KINDS) * 4)
    plan = {e.event_id: KINDS[i % len(KINDS)] for i, e in enumerate(events)}
    receiver = OddReceiver(plan)
    url = await receiver.start()
    try:
        yield receiver, url, plan
    finally:
        await receiver.close()


async def test_odd_answers_cost_one_attempt_and_everything_is_delivered_once_acknowledged(
    conn: asyncpg.Connection,
    database_url: str,
    receiver_and_events: tuple[OddReceiver, str, dict[str, str]],
    tmp_path: Path,
) -> None:
    receiver, url, plan = receiver_and_events
    env = relay_env(
        database_url,
        url,
        relay_quick_retries=0,
        relay_retry_schedule="0.2",
        relay_lease_seconds=5,  # a result never written would come back within the deadline
    )
    relay = RelayProcess(env, tmp_path / "relay.log").start()
    try:

        async def all_delivered() -> bool:
            return (await status_counts(conn)) == {"DELIVERED": len(plan)}

        await wait_until(all_delivered, timeout=DEADLINE_SECONDS, interval=0.1)
        assert relay.process is not None and relay.process.poll() is None
    finally:
        relay.ensure_stopped()
        print(await status_counts(conn), dump_logs([relay]))  # pytest shows it on a failure

    # Each event got its planned answer, then (if it was odd) exactly one 200, and nothing after.
    expected = {e: [k] if k == "ok" else [k, "ok"] for e, k in plan.items()}
    assert dict(receiver.answers) == expected
    assert receiver.acknowledged() == set(plan)

    rows = await conn.fetch(
        "SELECT event_id::text, attempts, last_status_code, last_error, attempt_log"
        " FROM outbox_events"
    )
    for row in rows:
        kind = plan[row["event_id"]]
        log = json.loads(row["attempt_log"])
        assert (row["attempts"], row["last_status_code"], row["last_error"]) == (
            len(expected[row["event_id"]]),
            200,
            None,
        )
        if kind == "ok":
            continue
        failed = log[0]
        assert failed["outcome"] == "PENDING" and failed["error"], (kind, failed)
        if kind == "status-999":
            assert (failed["status_code"], failed["error"]) == (None, "HTTP/1.1 999 Odd")
        elif kind == "nul-bytes-in-body":
            assert (failed["status_code"], failed["error"]) == (
                500,
                "HTTP 500: bad\ufffd\ufffdbody",
            )
        else:
            assert failed["status_code"] is None, (kind, failed)
