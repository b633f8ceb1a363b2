"""POST /payments through the embedded gateway, beside the same server without a gateway.

Both rows run the shipped configuration (SHIPPED) on a fresh database with its endpoints, one
after the other in the same run: first with GATEWAY=none (payments recorded, as every other row
of the benchmark), then charging at a `localstripe` process started as `payment-service run`
starts it (payment_service/gateway/embedded.py: 127.0.0.1, a fake key, the `localstripe`
flavour). Each charge is an intent created and then confirmed there: two calls per request. The
API's own CPU (its processes, from /proc/<pid>/stat) is measured apart from the gateway's
(localstripe's process), so the API's cost of a charge at a gateway shows without the fake's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from payment_service.gateway.embedded import EMBEDDED_API_KEY, EmbeddedGateway

from .contenders import SHIPPED, bench_server, bench_service, start_service
from .load import HttpResult
from .processes import descendants

if TYPE_CHECKING:
    from .harness import Bench


def bench_gateway(bench: Bench) -> dict[str, Any]:
    """The two rows (appended to results["http"] too) and their ratios."""
    label = f"serve --workers {SHIPPED.workers} --server {SHIPPED.server}"
    without = bench_service(
        bench, SHIPPED.workers, SHIPPED.server, SHIPPED.endpoints, SHIPPED.log_level, "gateway"
    )
    without.name = f"no gateway (GATEWAY=none), {SHIPPED.endpoints} endpoint(s)"
    bench.results["http"].append(without)
    gateway = EmbeddedGateway(log_path=bench.logs / "localstripe.log")
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
            lambda dsn: start_service(
                bench,
                dsn,
                workers=SHIPPED.workers,
                server=SHIPPED.server,
                log_level=SHIPPED.log_level,
                name="service-gateway",
                extra_env=settings,
            ),
            endpoints=SHIPPED.endpoints,
            groups={"gateway": lambda: _pids(gateway)},
        )
    finally:
        gateway.stop()
    through.endpoints = SHIPPED.endpoints
    bench.results["http"].append(through)
    return summary(without, through)


def _pids(gateway: EmbeddedGateway) -> set[int]:
    return descendants(gateway.process.pid) if gateway.process is not None else set()


def per_request_ms(row: HttpResult, group: str) -> float:
    """CPU milliseconds of a process group per answered request."""
    return row.cpu.get(group, 0.0) / row.rps * 1000 if row.rps else 0.0


def summary(without: HttpResult, through: HttpResult) -> dict[str, Any]:
    """The gateway row against the row without one, as ratios (pure)."""
    base_cpu = per_request_ms(without, "server")
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
        "notes": [r.note for r in (without, through) if r.note],
    }


def render_gateway(gateway: dict[str, Any]) -> list[str]:
    """The Markdown section of the two rows."""
    (rps_a, rps_b), (p99_a, p99_b) = gateway["rps"], gateway["p99_ms"]
    cpu_a, cpu_b = gateway["api_cpu_ms"]
    return [
        "### POST /payments through the embedded gateway",
        "",
        "The shipped configuration without a gateway (`GATEWAY=none`: recorded, as every row "
        "above), then charging at the embedded gateway (`localstripe` on 127.0.0.1, two calls "
        "per charge: the intent created, then confirmed), in the same run. The API's CPU is its "
        "own processes'; the gateway's is localstripe's process, apart. Ratios are against the "
        "row without a gateway.",
        "",
        "| row | req/s | p99 ms | API CPU ms per request | gateway CPU ms per request | errors |",
        "|---|---:|---:|---:|---:|---:|",
        f"| no gateway | {rps_a:,.0f} | {p99_a:.1f} | {cpu_a:.2f} | - | {gateway['errors'][0]} |",
        f"| through the embedded gateway | {rps_b:,.0f} ({gateway['rps_ratio']:.2f}x) | "
        f"{p99_b:.1f} ({gateway['p99_ratio']:.2f}x) | {cpu_b:.2f} "
        f"({gateway['api_cpu_ratio']:.2f}x) | {gateway['gateway_cpu_ms']:.2f} "
        f"({gateway['gateway_cpu_ratio']:.2f}x the API's without) | {gateway['errors'][1]} |",
        "",
    ]
