"""Subscribed endpoints for the benchmark, configured the way an operator would.

The first endpoint is `notification` (migration 0006 creates it without a URL); the others are
`trip`, `driver` and `rider`, added here without a URL as seeded endpoints. Every relay seeds
them from the integration guide's settings as it starts (`*_SERVICE_URL` + `*_CALLBACK_PATH`),
so a database can be filled with deliveries before the receivers' ports are known.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .harness import Bench

ENDPOINT_NAMES = ("notification", "trip", "driver", "rider")


def add_endpoints(bench: Bench, database: str, count: int) -> None:
    """Subscribe `count` endpoints (every event type) in `database`; `notification` exists."""
    if not 1 <= count <= len(ENDPOINT_NAMES):
        raise SystemExit(f"bench: 1 to {len(ENDPOINT_NAMES)} endpoints, not {count}")
    names = ENDPOINT_NAMES[1:count]
    if names:
        values = ", ".join(f"('{name}', NULL, '{{*}}', true)" for name in names)
        bench.pg.psql(
            f"INSERT INTO endpoints (name, url, event_types, seeded) VALUES {values}",
            database=database,
        )


def endpoint_settings(urls: list[str]) -> dict[str, str]:
    """The settings that seed endpoint i of ENDPOINT_NAMES with urls[i] (the first is required)."""
    env: dict[str, str] = {}
    for name, url in zip(ENDPOINT_NAMES, urls, strict=False):
        env[f"{name.upper()}_SERVICE_URL"] = url
        env[f"{name.upper()}_CALLBACK_PATH"] = f"/{name}"
    return env


def parse_counts(text: str) -> list[int]:
    """`--endpoints 1,4` -> [1, 4]; 1 (the baseline) always first."""
    counts = sorted({1, *(int(n) for n in text.split(",") if n)})
    if counts[-1] > len(ENDPOINT_NAMES):
        raise SystemExit(f"bench: --endpoints goes up to {len(ENDPOINT_NAMES)}")
    return counts
