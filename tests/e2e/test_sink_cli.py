"""`payment-service notification-sink` as the stand-in for several services at once: each on its
own port and path, each printed line naming its sink; and as the receiver of an added endpoint,
verifying with that endpoint's own secret (`--secret`)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx

from payment_service.embedded import free_port
from payment_service.signing import secret_key, sign
from tests.support.commands import service_command
from tests.support.environment import SECRET, minimal_environment, new_signing_secret
from tests.support.waiting import wait_until

Sink = tuple[subprocess.Popen[bytes], int, Path]


def start_sink(env: dict[str, str], out: Path, *args: str) -> Sink:
    port = free_port()
    with out.open("wb") as sink_out:
        process = subprocess.Popen(
            service_command("notification-sink", "--port", str(port), *args),
            env=env, cwd=out.parent, stdout=sink_out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return process, port, out


def printed(sink: Sink) -> list[dict[str, object]]:
    return [json.loads(line) for line in sink[2].read_text().splitlines()]


def signed(secret: str, webhook_id: str, body: bytes) -> dict[str, str]:
    now = int(time.time())
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(secret_key(secret), webhook_id, now, body),
        "content-type": "application/json",
    }


async def test_two_sinks_run_at_once_each_on_its_port_and_path_naming_itself(
    tmp_path: Path,
) -> None:
    env = minimal_environment(
        callback_signing_secret=SECRET, trip_callback_path="/trips/payment-events"
    )
    started: dict[str, Sink] = {}
    try:
        for name, args in (("notification", ()), ("trip", ("--name", "trip"))):
            started[name] = start_sink(env, tmp_path / f"{name}.out", *args)

        def lines(name: str) -> list[dict[str, object]]:
            return printed(started[name])

        def listening() -> bool:
            return all(any("msg" in x for x in lines(name)) for name in started)

        await wait_until(listening, timeout=30)

        body = b'{"event_type": "payment.succeeded", "amount": "10.00"}'
        headers = signed(SECRET, "evt-1", body)
        async with httpx.AsyncClient(trust_env=False) as http:
            for name, path in (
                ("notification", "/notifications"),
                ("trip", "/trips/payment-events"),
            ):
                url = f"http://127.0.0.1:{started[name][1]}"
                assert (
                    await http.post(url + path, content=body, headers=headers)
                ).status_code == 200
            trip_url = f"http://127.0.0.1:{started['trip'][1]}"
            assert (await http.post(trip_url + "/notifications", content=body)).status_code == 404

        for name in started:
            received = [x for x in lines(name) if "webhook_id" in x]
            assert [(x["sink"], x["webhook_id"], x["signature"]) for x in received] == [
                (name, "evt-1", "valid")
            ]
    finally:
        for process, _, _ in started.values():
            process.send_signal(signal.SIGTERM)
        assert all(process.wait(timeout=10) == 0 for process, _, _ in started.values())


async def test_the_sink_verifies_with_the_secret_it_is_given(tmp_path: Path) -> None:
    """`--secret` is the endpoint's own secret (what `endpoints add` printed), with no
    CALLBACK_SIGNING_SECRET at all: a callback signed with it is valid, one signed with another
    secret is refused (401)."""
    own, other = new_signing_secret(), new_signing_secret()
    sink = start_sink(minimal_environment(), tmp_path / "audit.out", "--secret", own)
    try:
        await wait_until(lambda: any("msg" in x for x in printed(sink)), timeout=30)
        body = b'{"event_type": "payment.succeeded", "amount": "10.00"}'
        url = f"http://127.0.0.1:{sink[1]}/notifications"
        async with httpx.AsyncClient(trust_env=False) as http:
            good = await http.post(url, content=body, headers=signed(own, "evt-1", body))
            bad = await http.post(url, content=body, headers=signed(other, "evt-2", body))
        assert (good.status_code, bad.status_code) == (200, 401)
        received = [(x["webhook_id"], x["signature"]) for x in printed(sink) if "webhook_id" in x]
        assert received == [("evt-1", "valid"), ("evt-2", "invalid")]
    finally:
        sink[0].send_signal(signal.SIGTERM)
        assert sink[0].wait(timeout=10) == 0


def test_a_secret_that_is_not_one_is_a_one_line_error(tmp_path: Path) -> None:
    finished = subprocess.run(
        service_command("notification-sink", "--port", "0", "--secret", "not-a-secret"),
        env=minimal_environment(), cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )  # fmt: skip

    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.strip().splitlines() == [
        "payment-service: --secret: a secret is 'whsec_' followed by base64 (Standard Webhooks)"
    ]
