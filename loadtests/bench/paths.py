"""Where the benchmark finds its scripts and leaves its reports."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOADTESTS = ROOT / "loadtests"
BIN = Path(sys.executable).parent  # the virtualenv's scripts: payment-service, gunicorn, …
WRK_SCRIPT = LOADTESTS / "wrk" / "create_payment.lua"
REPORTS = LOADTESTS / "reports"
DOC = ROOT / "docs" / "benchmarks.md"
