"""Prometheus's own binaries in the tests (Debian's `prometheus` package: promtool, prometheus).

Without them a test is skipped, naming the package, unless REQUIRE_PROMETHEUS=1 (set by .ci/run,
which installs the package): then their absence fails, so CI never skips these tests silently.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"


def prometheus_binary(name: str) -> str:
    """The path of `name` (promtool, prometheus); skips or fails the test when it is missing."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed (Debian: apt-get install prometheus; .ci/run does)"
    if os.environ.get("REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"REQUIRE_PROMETHEUS=1 but {reason}")
    pytest.skip(reason)
