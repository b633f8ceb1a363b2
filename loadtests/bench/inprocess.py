"""The app's own cost per request: requests through its ASGI callable, no HTTP server, no socket.

`python loadtests/bench/inprocess.py --requests 3000` starts an embedded PostgreSQL (durable
settings off: this measures the app, not the disk), migrates a database with four subscribed
endpoints, builds the app as a worker does (`create_app`, the JSON access log through its writer
thread) and sends POST /payments (or `--path` GETs) from `--concurrency` coroutines, each with a
fresh key and trip. It prints the process's CPU per request. Run as a script (not with -m), it
imports the app from PYTHONPATH first, so `PYTHONPATH=/some/checkout` measures that checkout.

Under `valgrind --tool=callgrind` (with `--dsn` of a database set up by an earlier run's
`--keep`), the difference of the instructions counted for two request counts, divided by the
difference of the counts, is the instructions per request: deterministic, whatever else the
machine runs. `--profile FILE` writes a cProfile of the measured requests, timed by the thread's
CPU clock.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WARMUP_PER_COROUTINE = 5
ENDPOINTS = ("trip", "driver", "rider")  # besides `notification`: four, as compose subscribes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python loadtests/bench/inprocess.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--path", default="/payments", help="POST /payments, or a path to GET")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--dsn", help="a migrated database (default: an embedded one, made here)")
    parser.add_argument("--keep", action="store_true", help="leave the embedded server running")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the measured requests")
    return parser.parse_args(argv)


def embedded_database(keep: bool) -> str:
    from payment_service.database import run_with_connection
    from payment_service.embedded import EmbeddedPostgres
    from payment_service.migrations import migrate

    directory = Path(tempfile.mkdtemp(prefix="payment-inprocess-"))
    pg = EmbeddedPostgres(directory / "pgdata", settings=["fsync=off", "synchronous_commit=off"])
    pg.start()
    pg.psql("CREATE DATABASE inprocess")
    dsn = pg.dsn("inprocess")

    async def prepare(conn: Any) -> None:
        await migrate(conn)
        names = ", ".join(f"('{name}', NULL, '{{*}}', true)" for name in ENDPOINTS)
        await conn.execute(f"INSERT INTO endpoints (name, url, event_types, seeded) VALUES {names}")

    run_with_connection(dsn, prepare)
    if keep:
        print(f"database kept running: --dsn {dsn} (stop: pg_ctl -D {directory / 'pgdata'} stop)")
    else:
        import atexit

        atexit.register(pg.stop)
    return dsn


def scope(method: str, path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8082"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8082),
        "extensions": {},
        "state": {},
    }


async def run(args: argparse.Namespace, dsn: str) -> None:
    from app import create_app
    from payment_service.config import load_settings
    from payment_service.logs import configure_logging

    configure_logging(args.log_level, queued=True)
    app = create_app(load_settings(database_url=dsn, _env_file=None))
    asgi: Any = app  # called as a server calls it, with plain dicts for the ASGI events
    await app.startup()
    numbers = itertools.count(1)
    prefix, trips = f"inprocess-{time.time_ns()}", time.time_ns() // 1000

    async def one() -> None:
        n = next(numbers)
        post = args.path == "/payments"
        body = (
            f'{{"idempotency_key":"{prefix}-{n}","trip_id":{trips + n},"method":"CARD",'
            f'"amount":150.00,"metadata":{{"note":"bench"}}}}'.encode()
            if post
            else b""
        )
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        status: list[int] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client stays: cancelled once the answer is out
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await asgi(scope("POST" if post else "GET", args.path, body), receive, send)
        if status != [200]:
            raise SystemExit(f"{args.path} answered {status}")

    async def requests(count: int) -> None:
        async def serial() -> None:
            for _ in range(count):
                await one()

        await asyncio.gather(*(serial() for _ in range(args.concurrency)))

    await requests(WARMUP_PER_COROUTINE)
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    per_coroutine = max(args.requests // args.concurrency, 1)
    cpu, wall = time.process_time(), time.perf_counter()
    if profiler:
        profiler.enable()
    await requests(per_coroutine)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    sent = per_coroutine * args.concurrency
    print(
        f"{sent} requests ({args.path}): {cpu / sent * 1000:.3f} ms CPU per request, "
        f"{sent / wall:,.0f} requests/s",
        flush=True,
    )
    await app.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dsn = args.dsn or embedded_database(args.keep)
    import uvloop

    uvloop.run(run(args, dsn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
