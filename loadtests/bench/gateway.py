"""POST /payments through the embedded gateway, beside the same server without a gateway.

Both rows run the shipped configuration (SHIPPED) on a fresh database with its endpoints, one
after the other in the same run: first with GATEWAY=none (payments recorded, as every other row
of the benchmark), then charging at a `localstripe` process started as `payment-service run`
starts it (payment_service/gateway/embedded.py: 127.0.0.1, a fake key, the `localstripe`
flavour). Each charge is an intent created and then confirmed there: two calls per request. The
API's own CPU (its processes, from /proc/<pid>/stat) is measured apart from the gateway's
(localstripe's process), so the API's cost of a charge at a gateway shows without the fake's.

The gateway row answers only as fast as localstripe (10-20 charges/s), so the API's fixed costs
(two workers' event loops, timers, pool keep-alives: CPU spent at any rate) are shared by few
requests, and nothing is batched (each request its own wake-ups, reads, writes and round trips):
its per-request CPU is inflated against the row at full rate. Two corrections, in the same run:
- each row's server is then measured idle for as long as it was loaded, and its CPU per request
  is also given net of that idle CPU ("net");
- a third row, no gateway again, is paced (an open-loop client, loadtests/bench/load.py) at the
  gateway row's rate: the API's cost per request at an equal rate, fixed costs and all.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from payment_service.gateway.embedded import EMBEDDED_API_KEY, EmbeddedGateway

from .contenders import SHIPPED, bench_server, bench_service, start_service
from .endpoints import add_endpoints
from .load import HttpResult, event_loop_runner, percentile, steady_load
from .paths import REPORTS
from .processes import CpuMeter, Proc, descendants, idle_cores
from .profiling import format_profile, record, summarize_profile

if TYPE_CHECKING:
    from .harness import Bench


def bench_gateway(bench: Bench) -> dict[str, Any]:
    """The three rows (appended to results["http"] too) and their ratios."""
    label = f"serve --workers {SHIPPED.workers} --server {SHIPPED.server}"
    idle = bench.args.duration
    without = bench_service(
        bench,
        SHIPPED.workers,
        SHIPPED.server,
        SHIPPED.endpoints,
        SHIPPED.log_level,
        "gateway",
        idle_seconds=idle,
    )
    without.name = f"no gateway (GATEWAY=none), {SHIPPED.endpoints} endpoint(s)"
    bench.results["http"].append(without)
    gateway = EmbeddedGateway(log_path=bench.logs / "localstripe.log")
    spies: list[tuple[subprocess.Popen[bytes], Path]] = []

    def spy(server: Proc) -> None:
        """With --profile, py-spy records the gateway row's server over its measured load (after
        the warm-up, which loads the SDK's modules)."""
        REPORTS.mkdir(parents=True, exist_ok=True)
        raw = REPORTS / f"profile-gateway-{dt.datetime.now():%Y%m%d-%H%M%S}.txt"
        spies.append((record(server.pid, bench.args.duration + 1, "raw", raw), raw))

    gateway.start()
    try:
        settings = {
            "GATEWAY": "stripe",
            "STRIPE_SECRET_KEY": EMBEDDED_API_KEY,
            "STRIPE_API_BASE": gateway.base_url,
            "STRIPE_API_FLAVOUR": "localstripe",
        }
        through = bench_server(
            bench,
            f"through the embedded gateway, {SHIPPED.endpoints} endpoint(s)",
            "gateway",
            f"{label}, GATEWAY=stripe (localstripe)",
            f"svc_gateway_{SHIPPED.workers}",
            lambda dsn: _start_shipped(bench, dsn, "service-gateway", settings),
            endpoints=SHIPPED.endpoints,
            groups={"gateway": lambda: _pids(gateway)},
            idle_seconds=idle,
            before_load=spy if bench.args.profile else None,
        )
    finally:
        gateway.stop()
    through.endpoints = SHIPPED.endpoints
    bench.results["http"].append(through)
    for py_spy, raw in spies:
        py_spy.wait(timeout=60)
        print(f"  profile of the gateway row's server (busy samples): {raw}", flush=True)
        print(format_profile(summarize_profile(raw, busy_only=True)), flush=True)
    paced = bench_paced(bench, through.rps) if through.rps else None
    if paced is not None:
        bench.results["http"].append(paced)
    return summary(without, through, paced)


def _start_shipped(
    bench: Bench, dsn: str, name: str, settings: dict[str, str] | None = None
) -> tuple[Proc, str]:
    return start_service(
        bench,
        dsn,
        workers=SHIPPED.workers,
        server=SHIPPED.server,
        log_level=SHIPPED.log_level,
        name=name,
        extra_env=settings,
    )


def bench_paced(bench: Bench, rate: float) -> HttpResult:
    """The shipped server without a gateway, paced at `rate` requests/s (the gateway row's):
    its CPU per request at the same rate, then idle as long."""
    db = f"svc_gateway_paced_{SHIPPED.workers}"
    dsn = bench.fresh_db(db)
    add_endpoints(bench, db, SHIPPED.endpoints)
    proc, base = _start_shipped(bench, dsn, "service-paced")
    run = event_loop_runner()
    connections = bench.args.connections

    def load(seconds: float) -> list[tuple[int | None, float, float, int]]:
        return run(
            steady_load(
                base,
                rate=rate,
                seconds=seconds,
                trip_base=bench.next_trip_base(),
                connections=connections,
            )
        )

    try:
        load(bench.args.warmup)
        with CpuMeter({"server": proc.pids}) as meter:
            answers = load(bench.args.duration)
        cores = dict(meter.cores)
        cores["server_idle"] = idle_cores({"server": proc.pids}, bench.args.duration)["server"]
    finally:
        proc.stop(signal.SIGTERM)
        bench.drop_db(db)
    answered = [a for a in answers if a[3] == 200]
    latencies = [(done - sent) * 1000 for _, sent, done, _ in answered]
    row = HttpResult(
        fsync=bench.fsync,
        name=f"no gateway, paced at {rate:.1f} req/s, {SHIPPED.endpoints} endpoint(s)",
        kind="gateway",
        config=f"{SHIPPED.server} --workers {SHIPPED.workers}, GATEWAY=none, open-loop client",
        rps=len(answered) / meter.elapsed,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        requests=len(answers),
        errors=len(answers) - len(answered),
        cpu=cores,
        endpoints=SHIPPED.endpoints,
    )
    print(
        f"  {row.name}: {row.rps:.1f} req/s, server {per_request_ms(row, 'server'):.2f} ms "
        f"CPU/req ({net_ms(row):.2f} net of its idle {cores['server_idle']:.3f} cores)",
        flush=True,
    )
    return row


def _pids(gateway: EmbeddedGateway) -> set[int]:
    return descendants(gateway.process.pid) if gateway.process is not None else set()


def per_request_ms(row: HttpResult, group: str) -> float:
    """CPU milliseconds of a process group per answered request."""
    return row.cpu.get(group, 0.0) / row.rps * 1000 if row.rps else 0.0


def net_ms(row: HttpResult) -> float:
    """The server's CPU milliseconds per answered request net of its idle CPU (`server_idle`,
    cores, measured over as long right after the load)."""
    busy = row.cpu.get("server", 0.0) - row.cpu.get("server_idle", 0.0)
    return busy / row.rps * 1000 if row.rps else 0.0


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def summary(
    without: HttpResult, through: HttpResult, paced: HttpResult | None = None
) -> dict[str, Any]:
    """The gateway row against the rows without one, as ratios (pure)."""
    base_cpu = per_request_ms(without, "server")
    net = [net_ms(without), net_ms(through)]
    return {
        "config": through.config,
        "rps": [without.rps, through.rps],
        "p99_ms": [without.p99_ms, through.p99_ms],
        "errors": [without.errors, through.errors],
        "api_cpu_ms": [base_cpu, per_request_ms(through, "server")],
        "gateway_cpu_ms": per_request_ms(through, "gateway"),
        "rps_ratio": through.rps / without.rps if without.rps else 0.0,
        "p99_ratio": through.p99_ms / without.p99_ms if without.p99_ms else 0.0,
        "api_cpu_ratio": per_request_ms(through, "server") / base_cpu if base_cpu else 0.0,
        "gateway_cpu_ratio": per_request_ms(through, "gateway") / base_cpu if base_cpu else 0.0,
        "api_cpu_net_ms": net,
        "api_idle_cores": [
            without.cpu.get("server_idle", 0.0),
            through.cpu.get("server_idle", 0.0),
        ],
        "api_cpu_net_ratio": _ratio(net[1], net[0]),
        "paced": None
        if paced is None
        else {
            "rps": paced.rps,
            "p99_ms": paced.p99_ms,
            "errors": paced.errors,
            "api_cpu_ms": per_request_ms(paced, "server"),
            "api_cpu_net_ms": net_ms(paced),
            "api_idle_cores": paced.cpu.get("server_idle", 0.0),
            # The gateway row against the row without one at the same rate.
            "api_cpu_ratio": _ratio(
                per_request_ms(through, "server"), per_request_ms(paced, "server")
            ),
            "api_cpu_net_ratio": _ratio(net[1], net_ms(paced)),
        },
        "notes": [r.note for r in (without, through) if r.note],
    }


def render_gateway(gateway: dict[str, Any]) -> list[str]:
    """The Markdown section of the rows."""
    (rps_a, rps_b), (p99_a, p99_b) = gateway["rps"], gateway["p99_ms"]
    cpu_a, cpu_b = gateway["api_cpu_ms"]
    net_a, net_b = gateway.get("api_cpu_net_ms", [0.0, 0.0])
    lines = [
        "### POST /payments through the embedded gateway",
        "",
        "The shipped configuration without a gateway (`GATEWAY=none`: recorded, as every row "
        "above), then charging at the embedded gateway (`localstripe` on 127.0.0.1, two calls "
        "per charge: the intent created, then confirmed), then without a gateway again, paced at "
        "the gateway row's rate, in the same run. The API's CPU is its own processes'; the "
        "gateway's is localstripe's process, apart. \"net\": less the API's CPU while idle "
        "(measured as long right after each row's load), divided by the requests. Ratios are "
        'against the row without a gateway ("paced": against the paced row).',
        "",
        "| row | req/s | p99 ms | API CPU ms per request | API CPU ms per request, net "
        "| gateway CPU ms per request | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| no gateway | {rps_a:,.0f} | {p99_a:.1f} | {cpu_a:.2f} | {net_a:.2f} | - "
        f"| {gateway['errors'][0]} |",
        f"| through the embedded gateway | {rps_b:,.0f} ({gateway['rps_ratio']:.2f}x) | "
        f"{p99_b:.1f} ({gateway['p99_ratio']:.2f}x) | {cpu_b:.2f} "
        f"({gateway['api_cpu_ratio']:.2f}x{_paced(gateway, 'api_cpu_ratio')}) | {net_b:.2f} "
        f"({gateway.get('api_cpu_net_ratio', 0.0):.2f}x{_paced(gateway, 'api_cpu_net_ratio')}) "
        f"| {gateway['gateway_cpu_ms']:.2f} "
        f"({gateway['gateway_cpu_ratio']:.2f}x the API's without) | {gateway['errors'][1]} |",
    ]
    if paced := gateway.get("paced"):
        lines.append(
            f"| no gateway, paced at the gateway row's rate | {paced['rps']:,.1f} | "
            f"{paced['p99_ms']:.1f} | {paced['api_cpu_ms']:.2f} | {paced['api_cpu_net_ms']:.2f} "
            f"| - | {paced['errors']} |"
        )
    return [*lines, ""]


def _paced(gateway: dict[str, Any], ratio: str) -> str:
    paced = gateway.get("paced")
    return f", {paced[ratio]:.2f}x paced" if paced else ""
