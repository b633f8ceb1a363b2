"""When to ask the gateway again about an operation it has not decided (pure)."""

from __future__ import annotations

import random

MAX_CHECK_INTERVAL_SECONDS = 3600.0  # the longest wait between two checks
JITTER = 0.1  # ±10 %: operations staged together are not checked together forever


def check_delay(first_seconds: float, checks: int, *, jitter: float = JITTER) -> float:
    """Seconds before the next check, after `checks` checks: `first_seconds`, doubling with each
    check up to MAX_CHECK_INTERVAL_SECONDS, with ±`jitter` spread."""
    base = min(first_seconds * 2.0 ** min(checks, 30), MAX_CHECK_INTERVAL_SECONDS)
    return base * random.uniform(1 - jitter, 1 + jitter)
