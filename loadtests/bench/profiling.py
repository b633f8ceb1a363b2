"""py-spy profiles of the API under wrk, summarised by library and by function."""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contenders import Shipped, start_service
from .endpoints import add_endpoints
from .paths import BIN, REPORTS

if TYPE_CHECKING:
    from .harness import Bench

CATEGORIES = [
    ("asyncpg (driver)", ("asyncpg",)),
    (
        "HTTP server (hypercorn/h11, uvicorn/httptools)",
        ("hypercorn", "h11", "h2/", "uvicorn", "httptools"),
    ),
    ("quart/werkzeug (framework)", ("quart/", "werkzeug", "quart_schema", "flask/")),
    ("pydantic (validation)", ("pydantic",)),
    ("logging", ("logging/", "payment_service/logs.py")),
    ("json", ("json/",)),
    ("prometheus_client (metrics)", ("prometheus_client",)),
    ("app code", ("/app/",)),
    ("asyncio/uvloop (event loop)", ("asyncio/", "uvloop")),
]


# Leaf frames of a process waiting, not working (py-spy's --nonblocking samples count them): the
# event loop's poll (uvloop's run, in C, under asyncio's Runner.run) and the log writer's sleep.
# Dropped with `busy_only`; uvloop's own C work under Runner.run goes with them.
IDLE_LEAVES = (
    "Runner.run (asyncio/runners.py:",
    "Condition.wait (threading.py:",
    "Event.wait (threading.py:",
)


def summarize_profile(raw: Path, *, busy_only: bool = False) -> dict[str, Any]:
    """Self and inclusive sample shares by function and by library from py-spy's raw output;
    with `busy_only`, of the samples whose leaf is not an idle wait (IDLE_LEAVES)."""
    total = 0
    self_counts: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    category_incl: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if busy_only and frames and frames[-1].startswith(IDLE_LEAVES):
            continue
        total += count
        if frames:
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
        for category, needles in CATEGORIES:
            if any(any(n in frame for n in needles) for frame in frames):
                category_incl[category] = category_incl.get(category, 0) + count
    top = sorted(self_counts.items(), key=lambda kv: -kv[1])[:25]
    return {
        "samples": total,
        "top_self": [(name, count / total) for name, count in top] if total else [],
        "categories": sorted(
            ((c, n / total) for c, n in category_incl.items()), key=lambda kv: -kv[1]
        )
        if total
        else [],
        "top_inclusive": [
            (name, count / total)
            for name, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:40]
        ]
        if total
        else [],
    }


def format_profile(summary: dict[str, Any]) -> str:
    lines = [f"    {summary['samples']} samples; inclusive share by library:"]
    lines += [f"      {share:6.1%}  {name}" for name, share in summary["categories"]]
    lines.append("    top self time:")
    lines += [f"      {share:6.1%}  {name}" for name, share in summary["top_self"][:15]]
    return "\n".join(lines)


def record(pid: int, seconds: float, fmt: str, path: Path) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` and its children for `seconds`, written as `fmt` to `path`."""
    py_spy = shutil.which("py-spy") or str(BIN / "py-spy")
    options = ["--rate", "200", "--duration", str(int(seconds)), "--format", fmt, "-o", str(path)]
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_service(bench: Bench, shipped: Shipped) -> dict[str, Any]:
    """py-spy of the shipped configuration (server, workers, LOG_LEVEL, endpoints) under wrk."""
    py_spy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(py_spy).exists():
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    db = "profile"
    dsn = bench.fresh_db(db)
    add_endpoints(bench, db, shipped.endpoints)
    service, base = start_service(
        bench,
        dsn,
        workers=shipped.workers,
        server=shipped.server,
        log_level=shipped.log_level,
        name="service-profile",
    )
    REPORTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = REPORTS / f"profile-{stamp}.txt"
    svg = REPORTS / f"profile-{stamp}.svg"
    seconds = int(bench.args.duration)
    try:
        bench.wrk(base + "/payments", bench.args.warmup, "pwarm")
        spies = [
            record(service.pid, seconds + 2, fmt, path)
            for fmt, path in (("raw", raw), ("flamegraph", svg))
        ]
        time.sleep(1.0)  # py-spy attaches
        stats, _ = bench.wrk(base + "/payments", seconds, "prof")
        for spy in spies:
            spy.wait(timeout=seconds + 60)
    finally:
        service.stop(signal.SIGTERM)
        bench.drop_db(db)
    summary = summarize_profile(raw)
    print(f"  profile: {raw} and {svg}", flush=True)
    print(format_profile(summary), flush=True)
    return {
        "raw": str(raw),
        "svg": str(svg),
        "summary": summary,
        "rps_under_profiler": stats["requests"] / (stats["duration_us"] / 1e6),
    }
