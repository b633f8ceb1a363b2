"""A receiver's answer, however odd, costs only that delivery an attempt.

A real relay process delivers to a misbehaving receiver on 127.0.0.1: the first request of each
event gets one kind of odd answer (NUL bytes in the body, status 999 or 099, broken or endless
chunked encodings, an endless body, a line that is not HTTP), every later request a plain 200.
With quick retries off, each odd answer is one recorded failed attempt; every event ends
DELIVERED, and no event the receiver acknowledged with a 2xx is sent again (a result the relay
failed to record would come back when its lease runs out).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import asyncpg

from tests.support.database import DELIVERY_ROWS, insert_events, status_counts
from tests.support.environment import relay_env
from tests.support.processes import RelayProcess, dump_logs
from tests.support.receiver import OK, Answer, Delivery, Raw, Receiver
from tests.support.waiting import wait_until

CHUNKED_200 = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
# kind -> the first bytes of the answer, then bytes written over and over until the relay hangs up
ODD_ANSWERS: dict[str, Raw] = {
    "nul-bytes-in-body": Raw(b"HTTP/1.1 500 Oops\r\ncontent-length: 9\r\n\r\nbad\x00\x00body"),
    "status-999": Raw(b"HTTP/1.1 999 Odd\r\ncontent-length: 0\r\n\r\n"),
    "status-099": Raw(b"HTTP/1.1 099 x\r\ncontent-length: 0\r\n\r\n"),
    "chunk-size-line-too-long": Raw(CHUNKED_200 + b"1" * (80 * 1024)),
    "negative-chunk-size": Raw(CHUNKED_200 + b"-5\r\nabc\r\n0\r\n\r\n"),
    "garbage-chunk-size": Raw(CHUNKED_200 + b"zz\r\nabc\r\n0\r\n\r\n"),
    "chunked-without-end": Raw(CHUNKED_200, b"400\r\n" + b"x" * 0x400 + b"\r\n"),
    "no-length-without-end": Raw(b"HTTP/1.1 200 OK\r\n\r\n", b"y" * 4096),
    "not-http": Raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
}
KINDS = ["ok", *ODD_ANSWERS]  # "ok": a plain 200 at once, in the same batches as the odd ones
DEADLINE_SECONDS = 60  # generous: the old relay never got there; it re-sent events for ever


class OddAnswers:
    """The receiver's policy: each event's first request gets its planned kind, later ones a 200."""

    def __init__(self, plan: dict[str, str]) -> None:
        self.plan = plan
        self.answers: dict[str, list[str]] = defaultdict(list)  # event_id -> kinds, in order

    async def __call__(self, delivery: Delivery) -> Answer:
        assert delivery.event_id is not None
        sent = self.answers[delivery.event_id]
        kind = self.plan[delivery.event_id] if not sent else "ok"
        sent.append(kind)
        return OK if kind == "ok" else ODD_ANSWERS[kind]


async def test_odd_answers_cost_one_attempt_and_everything_is_delivered_once_acknowledged(
    conn: asyncpg.Connection,
    database_url: str,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    events = await insert_events(conn, payments=len(KINDS) * 4)
    plan = {e.event_id: KINDS[i % len(KINDS)] for i, e in enumerate(events)}
    odd = OddAnswers(plan)
    receiver.policy = odd
    env = relay_env(
        database_url,
        receiver.base_url,
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
    assert dict(odd.answers) == expected
    assert receiver.accepted_ids() == set(plan)

    rows = await conn.fetch(
        "SELECT event_id::text, attempts, last_status_code, last_error, attempt_log"
        f" FROM {DELIVERY_ROWS}"
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
