"""The API process's CPU per request for POST /payments, A/B between source trees, in rounds.

`python -m loadtests.bench.cost --tree before=/tmp/old-checkout --tree after=. --rounds 3`

Throughput on a shared machine moves with whatever else runs; the CPU that the API process itself
spends per answered request moves much less. Each round runs every tree once (in alternating
order), each on a fresh database with the shipped number of subscribed endpoints, under wrk, and
reads the server's CPU from /proc (the same accounting as `make bench`). A tree is a checkout of
this repository: the server runs with that checkout first on PYTHONPATH, with this virtualenv's
packages. `--profile` also records a py-spy profile of each tree's server in the last round.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from .contenders import SHIPPED, measure_http, start_service
from .endpoints import add_endpoints
from .harness import Bench
from .paths import REPORTS, ROOT
from .profiling import format_profile, record, summarize_profile
from .runner import ensure_wrk


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench.cost", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a checkout to measure (repeat for A/B); default: this one",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--server", default=SHIPPED.server)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--endpoints", type=int, default=SHIPPED.endpoints)
    parser.add_argument("--log-level", default=SHIPPED.log_level)
    parser.add_argument("--fsync", choices=("on", "off"), default="on")
    parser.add_argument("--profile", action="store_true", help="py-spy in the last round")
    parser.add_argument("--nice", type=int, default=0, help="lower the nice value by N (root)")
    return parser.parse_args(argv)


def trees(specs: list[str]) -> dict[str, Path]:
    found = {}
    for spec in specs or [f"this={ROOT}"]:
        name, _, path = spec.partition("=")
        tree = Path(path).resolve()
        if not (tree / "app" / "__init__.py").exists():
            raise SystemExit(f"cost: {tree} is not a checkout of this repository")
        found[name] = tree
    return found


def measure(
    bench: Bench, args: argparse.Namespace, name: str, tree: Path, *, profile: bool
) -> dict[str, Any]:
    db = f"cost_{name}"
    dsn = bench.fresh_db(db)
    add_endpoints(bench, db, args.endpoints)
    service, base = start_service(
        bench,
        dsn,
        workers=args.workers,
        server=args.server,
        log_level=args.log_level,
        name=f"cost-{name}-{bench.run_counter}",
        extra_env={"PYTHONPATH": str(tree)},
    )
    spy = None
    raw = REPORTS / f"cost-{name}-{dt.datetime.now():%Y%m%d-%H%M%S}.txt"
    try:
        if profile:
            REPORTS.mkdir(parents=True, exist_ok=True)
            spy = record(service.pid, args.warmup + args.duration + 2, "raw", raw)
        result = measure_http(
            bench,
            name,
            "cost",
            str(tree),
            base + "/payments",
            {"server": service.pids},
            db,
            fan_out=True,
        )
        if spy is not None:
            spy.wait(timeout=args.warmup + args.duration + 60)
    finally:
        service.stop(signal.SIGTERM)
        bench.drop_db(db)
    if result.errors or result.note:
        raise SystemExit(f"cost: {name} answered errors or left rows inconsistent: {result}")
    row: dict[str, Any] = {
        "rps": result.rps,
        "cpu_ms": result.cpu.get("server", 0.0) / max(result.rps, 1e-9) * 1000,
        "other": result.cpu.get("other", 0.0),
    }
    if spy is not None and raw.exists():
        row["profile"] = summarize_profile(raw)
        row["profile_raw"] = str(raw)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkouts = trees(args.tree)
    ensure_wrk()
    if args.nice:
        os.nice(-args.nice)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory(prefix="payment-cost-") as tmp:
        bench = Bench(args, Path(tmp), fsync=args.fsync, results={})
        bench.start_database()
        try:
            for round_ in range(args.rounds):
                order = list(checkouts.items())
                if round_ % 2:
                    order.reverse()
                for name, tree in order:
                    last = round_ == args.rounds - 1
                    rows[name].append(
                        measure(bench, args, name, tree, profile=args.profile and last)
                    )
        finally:
            bench.pg.stop()
    print(
        f"\nserver CPU ms per request, POST /payments, {args.server} --workers {args.workers}, "
        f"LOG_LEVEL={args.log_level}, {args.endpoints} endpoint(s), fsync {args.fsync}, "
        f"{args.connections} connections, {args.duration:g} s x {args.rounds} rounds"
    )
    for name, measured in rows.items():
        cpu = [r["cpu_ms"] for r in measured]
        rps = [r["rps"] for r in measured]
        print(
            f"  {name:>12}: median {statistics.median(cpu):.3f} ms "
            f"(rounds {', '.join(f'{c:.3f}' for c in cpu)}); "
            f"req/s {', '.join(f'{r:,.0f}' for r in rps)}; "
            f"other CPU {', '.join(f'{o:.2f}' for o in (r['other'] for r in measured))}"
        )
    for name, measured in rows.items():
        if "profile" in measured[-1]:
            print(f"\n  profile of {name} ({measured[-1]['profile_raw']}):")
            print(format_profile(measured[-1]["profile"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
