"""`make bench`: side-by-side benchmarks on this machine, in one bounded run.

Starts a fresh embedded PostgreSQL (durable settings: fsync and synchronous_commit on), gives every
contender its own freshly migrated database, and measures:

- POST /payments at 32 connections (wrk + a Lua script that makes a fresh idempotency key and trip
  per request): this service (`payment-service serve --workers N`), the seed guide's own stack
  (Flask + psycopg2 on gunicorn, loadtests/baselines/seed_stack.py) and pgbench running the same
  transaction (the database's ceiling);
- POST /payments again with four subscribed endpoints (the API's statement fans every event out to
  each), beside the same server with today's one endpoint;
- the relay draining 50,000 pending deliveries into fast local receivers with 1, 2 and 4
  processes, to one endpoint and spread over four endpoints (one receiver each);
- commit-to-callback latency at a steady 200 payments/s, alone and while another subscribed
  endpoint refuses connections;
- the oldest pending delivery's age while the API runs flat out beside a relay;
- the delete rate the relay's housekeeping sustains while the API runs flat out, and the API's
  throughput then against without it.
- the mixed row: the same with four endpoints, two healthy, one answering 500 to half its
  callbacks and one refusing connections (the healthy ones' oldest pending age), then the
  flapping endpoint's drain rate once the load stops;
- POST /payments through the embedded gateway (localstripe), beside the same server without a
  gateway, with the API's CPU per request apart from the gateway's (section `gateway`).

Every process it starts listens on 127.0.0.1, is stopped by PID, and every run is bounded in time.
It prints a table and rewrites the generated part of docs/benchmarks.md. See --help.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from payment_service.gateway.embedded import installed as embedded_gateway_installed

from .chart import draw_chart
from .contenders import SHIPPED, auto_servers, bench_floor, bench_seed, bench_service
from .endpoints import ENDPOINT_NAMES, parse_counts
from .gateway import bench_gateway
from .harness import Bench
from .housekeeping import bench_housekeeping
from .load import HttpResult
from .paths import BIN, DOC, REPORTS
from .pgbench import PGBENCH_VARIANTS, bench_pgbench
from .profiling import profile_service
from .relay import bench_latency, bench_mixed, bench_pending, bench_relay, build_relay_template
from .report import machine_facts, print_table, render_markdown, write_doc

SECTIONS = (
    "service",
    "seed",
    "pgbench",
    "relay",
    "latency",
    "pending",
    "mixed",
    "housekeeping",
    "gateway",
    "profile",
)


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: installing Debian's package (apt-get install -y wrk)", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"], check=False, stdout=subprocess.DEVNULL
        )
    if not shutil.which("wrk"):
        raise SystemExit("bench: wrk is not installed (Debian: apt-get install -y wrk)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--duration", type=float, default=15, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of warm-up per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--workers", default="1,2", help="API worker counts to try")
    parser.add_argument(
        "--servers",
        default="auto",
        help="extra ASGI servers to try besides hypercorn: auto (what serve "
        "offers, plus uvicorn/granian when installed), none, or a comma list",
    )
    parser.add_argument(
        "--seed",
        default="sync:5,gthread:2x16",
        help="gunicorn configurations of the seed stack (class:workers[xthreads])",
    )
    parser.add_argument(
        "--pgbench",
        default="service,notify_after_commit,notify_in_transaction",
        help="pgbench variants of the service's statement to run, of: "
        + ", ".join(PGBENCH_VARIANTS),
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the floor row (the API's statement from a bare ASGI function, no framework)",
    )
    parser.add_argument(
        "--endpoints",
        default="1,4",
        help="subscribed endpoint counts (1 to "
        f"{len(ENDPOINT_NAMES)}; 1, the baseline, always runs): POST /payments and the relay "
        "are measured with each",
    )
    parser.add_argument(
        "--relay-events",
        type=int,
        default=50_000,
        help="deliveries per relay run, spread over the endpoints",
    )
    parser.add_argument("--relays", default="1,2,4")
    parser.add_argument("--relay-timeout", type=float, default=180)
    parser.add_argument("--rate", type=float, default=200, help="payments/s for the latency run")
    parser.add_argument("--rate-seconds", type=float, default=20)
    parser.add_argument("--pending-relays", type=int, default=1)
    parser.add_argument(
        "--housekeeping-deliveries",
        type=int,
        default=1_500_000,
        help="delivered deliveries past retention to fill in before the housekeeping run "
        "(enough that housekeeping still has work when the measured run ends)",
    )
    parser.add_argument(
        "--mixed-drain-seconds",
        type=float,
        default=30,
        help="mixed row: how long the flapping endpoint's drain is measured after the load",
    )
    parser.add_argument(
        "--fsync",
        choices=("on", "off", "both"),
        default="both",
        help="on: durable (as production); off: fsync/synchronous_commit off; both: the "
        "durable run, then POST /payments again without fsync (default)",
    )
    parser.add_argument(
        "--only", default="", help=f"comma list of sections to run (of {', '.join(SECTIONS)})"
    )
    parser.add_argument("--skip", default="", help="comma list of sections to skip")
    parser.add_argument(
        "--profile", action="store_true", help="also record py-spy profiles of the API under load"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower this run's nice value by N (root only): on a machine shared "
        "with other work, gives every process of the benchmark priority",
    )
    parser.add_argument("--output", type=Path, default=DOC, help="the Markdown file to update")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    wanted = {s for s in SECTIONS if (not only or s in only) and s not in skip}
    if not args.profile and not only:
        wanted.discard("profile")
    ensure_wrk()
    if args.nice:
        os.nice(-args.nice)  # inherited by every process started below, PostgreSQL included
    command = "python -m loadtests.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()
    results: dict[str, Any] = {
        "http": [],
        "relay": [],
        "latency": None,
        "latency_down": None,
        "pending": None,
        "housekeeping": None,
        "mixed": None,
        "gateway": None,
        "skipped": [],
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "connections": args.connections,
        "duration": args.duration,
        "warmup": args.warmup,
        "pg_settings": {},
    }
    modes = ["on", "off"] if args.fsync == "both" else [args.fsync]
    facts: dict[str, str] = {}
    for mode in modes:
        # The durable run measures everything; a run without fsync repeats only POST /payments,
        # to show what the disk's commit latency costs each contender.
        sections = wanted if mode == modes[0] else wanted & {"service", "seed", "pgbench"}
        if not sections:
            continue
        with tempfile.TemporaryDirectory(prefix="payment-bench-") as tmp:
            bench = Bench(args, Path(tmp), fsync=mode, results=results)
            results["pg_settings"][mode] = " ".join(bench.pg_settings)
            print(
                f"bench: embedded PostgreSQL ({results['pg_settings'][mode]}) in {tmp}", flush=True
            )
            bench.start_database()
            facts = facts or machine_facts(bench)
            try:
                run_sections(bench, args, sections)
            finally:
                bench.pg.stop()
    results["elapsed_s"] = time.monotonic() - started
    print_table(results)
    REPORTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = REPORTS / f"bench-{stamp}.json"
    json_path.write_text(
        json.dumps(
            {**results, "http": [r.__dict__ for r in results["http"]], "facts": facts},
            indent=2,
            default=str,
        )
    )
    print(f"\nraw results: {json_path}")
    if not args.no_doc:
        chart = draw_chart(
            results["http"],
            args.output.with_suffix(".png"),
            title=f"POST /payments at {args.connections} connections, {results['started']}, "
            f"this machine ({facts.get('cpu', '?')})",
        )
        results["chart"] = chart.name if chart else None
        write_doc(render_markdown(results, facts, command), args.output)
        print(f"updated {args.output}" + (f" and {chart}" if chart else ""))
    return 0


def attempt(
    results: dict[str, Any], label: str, keep: Callable[[Any], Any], run: Callable[[], Any]
) -> None:
    """Run one measurement; a failure is reported in the results and the run goes on."""
    try:
        keep(run())
    except Exception as error:  # one broken contender must not lose the others' figures
        print(f"  {label}: FAILED: {error}", flush=True)
        results["skipped"].append(f"{label} (failed: {str(error).splitlines()[0][:200]})")


def run_sections(bench: Bench, args: argparse.Namespace, wanted: set[str]) -> None:
    results = bench.results
    workers = [int(w) for w in args.workers.split(",") if w]
    app_ready = importlib.util.find_spec("app.server") is not None
    relay_ready = importlib.util.find_spec("outbox_relay.main") is not None
    best_workers = SHIPPED.workers  # the latency and pending runs use the shipped count
    endpoint_counts = parse_counts(args.endpoints)

    def measure(label: str, run: Callable[[], HttpResult]) -> None:
        attempt(results, label, results["http"].append, run)

    if "service" in wanted:
        if not app_ready:
            results["skipped"].append("service (app.server is missing)")
        else:
            run_service_rows(bench, args, workers, endpoint_counts, measure)
            if args.floor and (BIN / "uvicorn").exists():
                measure("floor", functools.partial(bench_floor, bench))
    if "seed" in wanted:
        for spec in (s for s in args.seed.split(",") if s):
            measure(f"seed {spec}", functools.partial(bench_seed, bench, spec))
    if "pgbench" in wanted:
        for script in (s for s in args.pgbench.split(",") if s):
            measure(f"pgbench {script}", functools.partial(bench_pgbench, bench, script))
    needs_relay = wanted & {"relay", "latency", "pending", "mixed", "housekeeping"}
    if needs_relay and not relay_ready:
        missing = ", ".join(sorted(needs_relay))
        results["skipped"].append(f"{missing} (outbox_relay.main is missing)")
    elif needs_relay:
        if "relay" in wanted:
            for count in endpoint_counts:
                build_relay_template(bench, count)
                for n in (int(r) for r in args.relays.split(",") if r):
                    attempt(
                        results,
                        f"relay x{n}, {count} endpoint(s)",
                        results["relay"].append,
                        functools.partial(bench_relay, bench, n, count),
                    )
        if "latency" in wanted and app_ready:
            for key, down in (("latency", False), ("latency_down", True)):
                attempt(
                    results,
                    key,
                    functools.partial(results.__setitem__, key),
                    functools.partial(bench_latency, bench, best_workers, down=down),
                )
        if "pending" in wanted and app_ready:
            attempt(
                results,
                "pending",
                lambda r: results.__setitem__("pending", r),
                lambda: bench_pending(bench, best_workers, args.pending_relays),
            )
        if "mixed" in wanted and app_ready:
            attempt(
                results,
                "mixed",
                lambda r: results.__setitem__("mixed", r),
                lambda: bench_mixed(bench, best_workers),
            )
        if "housekeeping" in wanted and app_ready:
            attempt(
                results,
                "housekeeping",
                functools.partial(results.__setitem__, "housekeeping"),
                functools.partial(bench_housekeeping, bench, best_workers, max(endpoint_counts)),
            )
    if "gateway" in wanted and app_ready:
        if not embedded_gateway_installed():
            results["skipped"].append("gateway (localstripe, the embedded extra, is missing)")
        else:
            attempt(
                results,
                "gateway",
                functools.partial(results.__setitem__, "gateway"),
                functools.partial(bench_gateway, bench),
            )
    if "profile" in wanted and app_ready:
        results["profile"] = profile_service(bench, SHIPPED)


def run_service_rows(
    bench: Bench,
    args: argparse.Namespace,
    workers: list[int],
    endpoint_counts: list[int],
    measure: Callable[[str, Callable[[], HttpResult]], None],
) -> None:
    """Each server at each worker count with the most endpoints and the access log on (the row
    that is the shipped configuration says so); then the shipped configuration with LOG_LEVEL=
    WARNING (the access log off) and with one endpoint, to show what each costs."""
    extra = (
        auto_servers()
        if args.servers == "auto"
        else ([] if args.servers == "none" else args.servers.split(","))
    )
    servers = list(dict.fromkeys(["hypercorn", SHIPPED.server, *extra]))
    fan_out = max(endpoint_counts)
    for server in servers:
        for n in workers:
            shipped = (server, n, fan_out) == (SHIPPED.server, SHIPPED.workers, SHIPPED.endpoints)
            measure(
                f"serve --workers {n} --server {server}",
                functools.partial(
                    bench_service,
                    bench,
                    n,
                    server,
                    fan_out,
                    SHIPPED.log_level,
                    "shipped" if shipped else "service",
                ),
            )
    if not any(r.kind == "shipped" for r in bench.results["http"] if r.fsync == bench.fsync):
        measure(
            "shipped configuration",
            functools.partial(
                bench_service,
                bench,
                SHIPPED.workers,
                SHIPPED.server,
                SHIPPED.endpoints,
                SHIPPED.log_level,
                "shipped",
            ),
        )
    variants = [("logs-off", SHIPPED.endpoints, "WARNING")]
    if fan_out > 1:
        variants.append(("service", 1, SHIPPED.log_level))
    for kind, endpoints, level in variants:
        measure(
            f"shipped configuration, {endpoints} endpoint(s), LOG_LEVEL={level}",
            functools.partial(
                bench_service, bench, SHIPPED.workers, SHIPPED.server, endpoints, level, kind
            ),
        )


if __name__ == "__main__":
    sys.exit(main())
