"""The load generators: wrk at a set number of connections, an open-loop client at a set rate."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .paths import WRK_SCRIPT
from .processes import CpuMeter, children_cpu_seconds


@dataclass
class HttpResult:
    name: str
    kind: str  # shipped | service | logs-off | seed | floor | pgbench
    config: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu: dict[str, float] = field(default_factory=dict)
    note: str = ""
    fsync: str = "on"
    endpoints: int = 1  # subscribed endpoints (this service's rows)


def run_wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    threads: int,
    prefix: str,
    trip_base: int,
    meter_groups: dict[str, Callable[[], set[int]]] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        prefix,
        str(trip_base),
    ]
    before = children_cpu_seconds()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with CpuMeter(dict(meter_groups or {})) as meter:
        out, _ = proc.communicate(timeout=seconds + 60)
    meter.add("wrk", children_cpu_seconds() - before)
    match = re.search(r"^WRK_JSON (\{.*\})$", out, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}):\n{out[-2000:]}")
    return json.loads(match.group(1)), meter.cores


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def event_loop_runner() -> Callable[[Any], Any]:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


async def steady_load(
    base: str, *, rate: float, seconds: float, trip_base: int, connections: int = 16
) -> list[tuple[int | None, float, float, int]]:
    """Open-loop POST /payments at a fixed rate over keep-alive connections.

    Returns (payment_id, sent, answered, status) per request, times from time.time().
    """
    host, port = base.removeprefix("http://").split(":")
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection(host, int(port)))
    results: list[tuple[int | None, float, float, int]] = []

    async def one(index: int) -> None:
        body = json.dumps(
            {
                "idempotency_key": f"steady-{trip_base}-{index}",
                "trip_id": trip_base + index,
                "method": "CARD",
                "amount": "150.00",
            }
        ).encode()
        request = (
            b"POST /payments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        reader, writer = await idle.get()
        started = time.time()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        data = await reader.readexactly(int(length.group(1))) if length else b""
        answered = time.time()
        idle.put_nowait((reader, writer))
        status = int(head[9:12])
        payment_id = json.loads(data).get("payment_id") if status == 200 else None
        results.append((payment_id, started, answered, status))

    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    start = loop.time()
    tasks = []
    for index in range(total):
        delay = start + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing of an open-loop generator, not synchronisation
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 60)
    while not idle.empty():
        _, writer = idle.get_nowait()
        writer.close()
    return results
