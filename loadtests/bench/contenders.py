"""POST /payments contenders under wrk: this service (under each ASGI server), the floor (a bare
ASGI function) and the seed guide's own stack, each on a fresh database."""

from __future__ import annotations

import functools
import re
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .endpoints import add_endpoints
from .load import HttpResult
from .paths import BIN, LOADTESTS, ROOT
from .processes import Proc, fmt_cpu, free_port, idle_cores, wait_http

if TYPE_CHECKING:
    from .harness import Bench


def start_service(
    bench: Bench,
    dsn: str,
    *,
    workers: int,
    server: str | None = None,
    log_level: str = "INFO",
    name: str = "service",
    extra_env: dict[str, str] | None = None,
) -> tuple[Proc, str]:
    port = free_port()
    cmd = [
        str(BIN / "payment-service"),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if server and server in serve_servers():
        cmd += ["--server", server]
    elif server:
        cmd = direct_server_command(server, port=port, workers=workers)
    proc = Proc(
        name,
        cmd,
        env=bench.env(
            DATABASE_URL=dsn,
            CALLBACK_SIGNING_SECRET=bench.secret,
            LOG_LEVEL=log_level,
            **(extra_env or {}),
        ),
        logs=bench.logs,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc)
    return proc, base


def start_seed(bench: Bench, dsn: str, spec: str) -> tuple[Proc, str]:
    worker_class, workers, threads = parse_seed_spec(spec)
    port = free_port()
    cmd = [
        str(BIN / "gunicorn"),
        "--workers",
        str(workers),
        "--worker-class",
        worker_class,
        "--threads",
        str(threads),
        "--bind",
        f"127.0.0.1:{port}",
        "--backlog",
        "2048",
        "--chdir",
        str(LOADTESTS / "baselines"),
        "seed_stack:create_app()",
    ]
    proc = Proc(
        f"seed-{spec}",
        cmd,
        env=bench.env(DATABASE_URL=dsn, DB_POOL_MAX=str(max(threads, 1))),
        logs=bench.logs,
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc)
    return proc, base


def measure_http(
    bench: Bench,
    name: str,
    kind: str,
    config: str,
    url: str,
    groups: dict[str, Callable[[], set[int]]],
    dsn_db: str,
    fan_out: bool = False,
    before_load: Callable[[], None] | None = None,
) -> HttpResult:
    """wrk against `url`; afterwards payments, outbox events and idempotency rows must match one
    for one, and with `fan_out` (the API's statement) every event has one delivery per endpoint.
    `before_load` is called after the warm-up, right before the measured load."""
    args = bench.args
    bench.wrk(url, args.warmup, f"warm{bench.run_counter}")
    bench.pg.psql("CHECKPOINT")
    if before_load is not None:
        before_load()
    groups = {**groups, "postgres": bench.postgres_pids}
    stats, cores = bench.wrk(url, args.duration, f"run{bench.run_counter}", groups)
    seconds = stats["duration_us"] / 1e6
    errors = sum(
        stats[k]
        for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    checked = "payments/outbox/idempotency" + ("/deliveries" if fan_out else "")
    consistent = bench.scalar(
        dsn_db,
        "SELECT (SELECT count(*) FROM payments) = (SELECT count(*) FROM outbox_events)"
        " AND (SELECT count(*) FROM payments) = (SELECT count(*) FROM idempotency_keys)"
        + (
            " AND (SELECT count(*) FROM deliveries)"
            " = (SELECT count(*) FROM outbox_events) * (SELECT count(*) FROM endpoints)"
            if fan_out
            else ""
        ),
    )
    result = HttpResult(
        fsync=bench.fsync,
        name=name,
        kind=kind,
        config=config,
        rps=(stats["requests"] - stats["status_errors"]) / seconds,
        p50_ms=stats["p50_us"] / 1000,
        p99_ms=stats["p99_us"] / 1000,
        requests=stats["requests"],
        errors=errors,
        cpu=cores,
        note="" if consistent == "t" else f"row counts differ: {checked}",
    )
    print(
        f"  {name} [{config}] {result.rps:8.0f} req/s  p50 {result.p50_ms:6.1f} ms  "
        f"p99 {result.p99_ms:6.1f} ms  errors {errors}  server "
        f"{cores.get('server', 0.0) / max(result.rps, 1e-9) * 1000:.2f} ms CPU/req  "
        f"cpu {fmt_cpu(cores)}",
        flush=True,
    )
    return result


def bench_server(
    bench: Bench,
    name: str,
    kind: str,
    label: str,
    db: str,
    start: Callable[[str], tuple[Proc, str]],
    endpoints: int | None = None,
    groups: dict[str, Callable[[], set[int]]] | None = None,
    idle_seconds: float = 0.0,
    before_load: Callable[[Proc], None] | None = None,
) -> HttpResult:
    """Start a server on a fresh database, load it with wrk, stop it.

    `endpoints`: the server runs the API's statement, with this many endpoints subscribed to every
    event type (no relay runs: their deliveries stay pending, as the events did before).
    `groups`: other processes whose CPU is measured apart (the gateway's).
    `idle_seconds`: then the server's CPU without load over that long, in `cpu["server_idle"]`
    (cores): what its processes spend whatever the rate.
    `before_load`: called with the server after the warm-up, right before the measured load.
    """
    dsn = bench.fresh_db(db)
    if endpoints is not None:
        add_endpoints(bench, db, endpoints)
    proc, base = start(dsn)
    try:
        result = measure_http(
            bench,
            name,
            kind,
            label,
            base + "/payments",
            {"server": proc.pids, **(groups or {})},
            db,
            fan_out=endpoints is not None,
            before_load=None if before_load is None else functools.partial(before_load, proc),
        )
        if idle_seconds:
            result.cpu["server_idle"] = idle_cores({"server": proc.pids}, idle_seconds)["server"]
        return result
    finally:
        proc.stop(signal.SIGTERM)
        bench.drop_db(db)


@dataclass(frozen=True)
class Shipped:
    """What compose and the Dockerfile run: `payment-service serve` with its defaults, the
    settings' LOG_LEVEL (the access log on) and four subscribed endpoints.
    tests/unit/test_bench_shipped.py holds it to the CLI, the settings and docker-compose.yml."""

    server: str = "uvicorn"
    workers: int = 2
    log_level: str = "INFO"
    endpoints: int = 4


SHIPPED = Shipped()


def bench_service(
    bench: Bench,
    workers: int,
    server: str,
    endpoints: int = 1,
    log_level: str = "INFO",
    kind: str = "service",
    idle_seconds: float = 0.0,
) -> HttpResult:
    """This service under `server` with `workers`, `endpoints` subscribed to every event type and
    LOG_LEVEL; `kind` "shipped" marks the configuration compose runs."""
    label = f"serve --workers {workers} --server {server}, LOG_LEVEL={log_level}"
    shipped = "shipped: " if kind == "shipped" else ""
    result = bench_server(
        bench,
        f"{shipped}this service ({server}), {endpoints} endpoint(s)",
        kind,
        label,
        f"svc_{server}_{workers}_{endpoints}_{log_level.lower()}",
        lambda dsn: start_service(bench, dsn, workers=workers, server=server, log_level=log_level),
        endpoints=endpoints,
        idle_seconds=idle_seconds,
    )
    result.endpoints = endpoints
    return result


def bench_floor(bench: Bench) -> HttpResult:
    """The API's statement from a bare ASGI function under Uvicorn (loadtests/whatif)."""

    def start(dsn: str) -> tuple[Proc, str]:
        port = free_port()
        cmd = [
            str(BIN / "uvicorn"),
            "loadtests.whatif.bare_asgi:app",
            "--app-dir",
            str(ROOT),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        proc = Proc("floor", cmd, env=bench.env(DATABASE_URL=dsn), logs=bench.logs)
        wait_http(f"http://127.0.0.1:{port}/", proc)
        return proc, f"http://127.0.0.1:{port}"

    return bench_server(
        bench,
        "floor: bare ASGI + asyncpg",
        "floor",
        "uvicorn, 1 worker, no framework",
        "floor",
        start,
    )


def bench_seed(bench: Bench, spec: str) -> HttpResult:
    worker_class, workers, threads = parse_seed_spec(spec)
    label = f"gunicorn -k {worker_class} -w {workers}" + (
        f" --threads {threads}" if worker_class == "gthread" else ""
    )
    return bench_server(
        bench,
        "seed stack (Flask+psycopg2)",
        "seed",
        label,
        "seed_" + re.sub(r"\W", "_", spec),
        lambda dsn: start_seed(bench, dsn, spec),
    )


def parse_seed_spec(spec: str) -> tuple[str, int, int]:
    """`sync:5` or `gthread:2x16` -> (worker class, workers, threads)."""
    worker_class, _, size = spec.partition(":")
    workers, _, threads = size.partition("x")
    return worker_class, int(workers), int(threads or 1)


@functools.cache
def serve_servers() -> list[str]:
    """The --server choices `payment-service serve` offers, if any."""
    out = subprocess.run(
        [str(BIN / "payment-service"), "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    match = re.search(r"--server \{([^}]*)\}", out)
    return match.group(1).split(",") if match else []


def auto_servers() -> list[str]:
    """What `serve --server` offers besides Hypercorn, plus the other ASGI servers installed
    (launched directly)."""
    offered = [name for name in serve_servers() if name != "hypercorn"]
    others = [name for name in ("uvicorn", "granian") if name not in offered]
    return offered + [name for name in others if (BIN / name).exists()]


def direct_server_command(server: str, *, port: int, workers: int) -> list[str]:
    """The same app (`app.asgi:build()`) under another ASGI server, launched directly.

    Used while `payment-service serve` has no `--server` option, to measure what one would give.
    """
    common = ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if server == "uvicorn":
        return [
            str(BIN / "uvicorn"),
            "app.asgi:build",
            "--factory",
            *common,
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--backlog",
            "2048",
            "--log-level",
            "warning",
        ]
    if server == "granian":
        return [
            str(BIN / "granian"),
            "--interface",
            "asgi",
            "--factory",
            *common,
            "--loop",
            "uvloop",
            "--no-access-log",
            "--backlog",
            "2048",
            "--log-level",
            "warning",
            "--no-ws",
            "app.asgi:build",
        ]
    raise SystemExit(f"bench: unknown ASGI server {server!r} (uvicorn, granian)")
