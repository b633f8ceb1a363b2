"""`payment-service notification-sink` as the stand-in for several services at once: each on its
own port and path, each printed line naming its sink."""

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
from tests.support.environment import SECRET, minimal_environment
from tests.support.waiting import wait_until


async def test_two_sinks_run_at_once_each_on_its_port_and_path_naming_itself(
    tmp_path: Path,
) -> None:
    env = minimal_environment(
        callback_signing_secret=SECRET, trip_callback_path="/trips/payment-events"
    )
    started: dict[str, tuple[subprocess.Popen[bytes], int, Path]] = {}
    try:
        for name, args in (("notification", ()), ("trip", ("--name", "trip"))):
            port, out = free_port(), tmp_path / f"{name}.out"
            with out.open("wb") as sink_out:
                process = subprocess.Popen(
                    service_command("notification-sink", "--port", str(port), *args),
                    env=env, cwd=tmp_path, stdout=sink_out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            started[name] = (process, port, out)

        def lines(name: str) -> list[dict[str, object]]:
            return [json.loads(line) for line in started[name][2].read_text().splitlines()]

        def listening() -> bool:
            return all(any("msg" in x for x in lines(name)) for name in started)

        await wait_until(listening, timeout=30)

        body = b'{"event_type": "payment.succeeded", "amount": "10.00"}'
        now = int(time.time())
        headers = {
            "webhook-id": "evt-1",
            "webhook-timestamp": str(now),
            "webhook-signature": sign(secret_key(SECRET), "evt-1", now, body),
            "content-type": "application/json",
        }
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
