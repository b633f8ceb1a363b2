"""The bench's gateway rows as ratios against the row without a gateway (pure), and the section
is selectable with --only."""

from __future__ import annotations

from pathlib import Path

from loadtests.bench.gateway import render_gateway, summary
from loadtests.bench.load import HttpResult
from loadtests.bench.profiling import summarize_profile
from loadtests.bench.runner import SECTIONS, parse_args


def row(rps: float, p99: float, cpu: dict[str, float]) -> HttpResult:
    return HttpResult(
        name="r", kind="gateway", config="c", rps=rps, p50_ms=1, p99_ms=p99, requests=1,
        errors=0, cpu=cpu,
    )  # fmt: skip


def test_the_gateway_row_against_the_row_without() -> None:
    without = row(1000, 10, {"server": 0.8})  # 0.8 ms of API CPU per request
    through = row(250, 40, {"server": 0.4, "gateway": 0.5})  # 1.6 ms API, 2.0 ms gateway
    figures = summary(without, through)
    assert round(figures["rps_ratio"], 3) == 0.25
    assert round(figures["p99_ratio"], 3) == 4
    assert [round(v, 3) for v in figures["api_cpu_ms"]] == [0.8, 1.6]
    assert round(figures["api_cpu_ratio"], 3) == 2
    assert round(figures["gateway_cpu_ms"], 3) == 2
    assert round(figures["gateway_cpu_ratio"], 3) == 2.5
    table = "\n".join(render_gateway(figures))
    assert "| through the embedded gateway | 250 (0.25x) | 40.0 (4.00x) | 1.60 (2.00x) |" in table


def test_the_section_is_selectable() -> None:
    assert "gateway" in SECTIONS
    assert parse_args(["--only", "gateway"]).only == "gateway"


def test_net_of_idle_and_against_the_paced_row() -> None:
    # 0.1 core idle: 0.8 -> 0.7 ms net at 1000 req/s; 0.4 -> 0.3 core busy at 20 req/s: 15 ms net.
    without = row(1000, 10, {"server": 0.8, "server_idle": 0.1})
    through = row(20, 40, {"server": 0.4, "server_idle": 0.1, "gateway": 0.5})
    paced = row(20, 5, {"server": 0.2, "server_idle": 0.1})  # 10 ms gross, 5 ms net
    figures = summary(without, through, paced)
    assert [round(v, 3) for v in figures["api_cpu_net_ms"]] == [0.7, 15]
    assert round(figures["api_cpu_net_ratio"], 3) == round(15 / 0.7, 3)
    assert round(figures["paced"]["api_cpu_ms"], 3) == 10
    assert round(figures["paced"]["api_cpu_net_ms"], 3) == 5
    assert round(figures["paced"]["api_cpu_ratio"], 3) == 2
    assert round(figures["paced"]["api_cpu_net_ratio"], 3) == 3
    table = "\n".join(render_gateway(figures))
    assert "| 20.00 (25.00x, 2.00x paced) | 15.00 (21.43x, 3.00x paced) |" in table
    assert (
        "| no gateway, paced at the gateway row's rate | 20.0 | 5.0 | 10.00 | 5.00 | - | 0 |"
        in (table)
    )


def test_a_profile_of_busy_samples_leaves_the_idle_waits_out(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "process 1:x;Runner.run (asyncio/runners.py:118) 6\n"
        "process 1:x;Thread.run (threading.py:1);Condition.wait (threading.py:331) 2\n"
        "process 1:x;Runner.run (asyncio/runners.py:118);charge (app/service.py:1) 1\n"
        "process 1:x;Runner.run (asyncio/runners.py:118);fetch (asyncpg/connection.py:2) 1\n"
    )
    assert summarize_profile(raw)["samples"] == 10
    busy = summarize_profile(raw, busy_only=True)
    assert busy["samples"] == 2
    assert dict(busy["top_self"]) == {
        "charge (app/service.py:1)": 0.5,
        "fetch (asyncpg/connection.py:2)": 0.5,
    }
