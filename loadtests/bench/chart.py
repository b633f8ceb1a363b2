"""The side-by-side chart of POST /payments (a PNG beside docs/benchmarks.md), drawn with
matplotlib from the durable run's rows: throughput and p99 of each contender."""

from __future__ import annotations

from pathlib import Path

from .load import HttpResult

COLOURS = {
    "shipped": "#1b7837",
    "service": "#7fbf7b",
    "logs-off": "#a6dba0",
    "floor": "#9970ab",
    "seed": "#d6604d",
    "pgbench": "#878787",
}
P99_TARGET_MS = 50.0
RATIO_TARGET = 2.0


def draw_chart(http: list[HttpResult], path: Path, *, title: str) -> Path | None:
    """Write the chart to `path`; None when matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed (the bench extra): no chart", flush=True)
        return None
    mode = "on" if any(r.fsync == "on" for r in http) else "off"
    rows = [r for r in http if r.fsync == mode and r.rps > 0]
    if not rows:
        return None
    seed = max((r for r in rows if r.kind == "seed"), key=lambda r: r.rps, default=None)
    labels = [f"{r.name}\n{r.config}" for r in rows]
    colours = [COLOURS.get(r.kind, "#4393c3") for r in rows]
    positions = list(range(len(rows)))[::-1]  # the first row on top

    figure, (left, right) = plt.subplots(
        1, 2, figsize=(15, 0.62 * len(rows) + 2.2), sharey=True, width_ratios=(3, 1.3)
    )
    left.barh(positions, [r.rps for r in rows], color=colours)
    for y, r in zip(positions, rows, strict=True):
        ratio = f"  {r.rps / seed.rps:.2f}x seed" if seed and r.kind != "pgbench" else ""
        left.text(r.rps, y, f" {r.rps:,.0f}{ratio}", va="center", fontsize=8)
    if seed:
        left.axvline(seed.rps * RATIO_TARGET, color="#d6604d", linestyle="--", linewidth=1)
        left.text(
            seed.rps * RATIO_TARGET,
            max(positions) + 0.6,
            f" {RATIO_TARGET:g}x seed stack",
            color="#d6604d",
            fontsize=8,
        )
    left.set_yticks(positions, labels, fontsize=8)
    left.set_xlabel("POST /payments, requests/s (higher is better)")
    left.set_xlim(0, max(r.rps for r in rows) * 1.3)
    left.set_ylim(-0.7, max(positions) + 1.0)

    right.barh(positions, [r.p99_ms for r in rows], color=colours)
    for y, r in zip(positions, rows, strict=True):
        right.text(r.p99_ms, y, f" {r.p99_ms:.0f}", va="center", fontsize=8)
    right.axvline(P99_TARGET_MS, color="#d6604d", linestyle="--", linewidth=1)
    right.set_xlabel("p99 ms (lower is better; dashed: 50 ms goal)")
    right.set_xlim(0, max(max(r.p99_ms for r in rows), P99_TARGET_MS) * 1.25)

    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
