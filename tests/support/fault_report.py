"""What each gateway fault test counted at the gateway, for a closing note.

A fault test calls `record(...)` at its end; with `GATEWAY_FAULT_REPORT` set to a file name, one
JSON line per test is appended to that file (nothing is written otherwise). Print the lines as a
markdown table with:

    python -m tests.support.fault_report FILE
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.support.money_checks import Counts

REPORT_VARIABLE = "GATEWAY_FAULT_REPORT"

COLUMNS = [
    ("test", "test"),
    ("payments", "payments"),
    ("intents created", "intents_created"),
    ("intents confirmed", "intents_confirmed"),
    ("orphan intents", "orphan_intents"),
    ("refunds at gateway", "refunds_at_gateway"),
    ("payments FAILED", "failed_payments"),
    ("review-flagged", "review_flagged"),
    ("check", "check"),
    ("reconcile", "reconcile"),
    ("seconds", "seconds"),
]


def record(test: str, counts: Counts, *, check: str, seconds: float, **extra: Any) -> None:
    """Append this test's line to the report file, if one is asked for."""
    target = os.environ.get(REPORT_VARIABLE)
    if not target:
        return
    line = {"test": test, **counts.as_dict(), "check": check, "seconds": round(seconds, 1)}
    line.update(extra)
    with Path(target).open("a", encoding="utf-8") as report:
        report.write(json.dumps(line, sort_keys=True) + "\n")


def table(lines: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = [
        "| " + " | ".join(str(line.get(key, "")) for _, key in COLUMNS) + " |" for line in lines
    ]
    return "\n".join([header, rule, *rows])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.support.fault_report FILE", file=sys.stderr)
        return 2
    text = Path(argv[0]).read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    print(table(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
