"""`make loadtest`: a bounded, headless Locust run that leaves CSV and HTML reports.

Against `LOADTEST_HOST` when set; otherwise it starts its own service first — `payment-service
run` (embedded PostgreSQL in a temporary data directory, API and relay) on free 127.0.0.1 ports,
with the callbacks going to a local receiver (loadtests/receiver.py) — and stops it by PID at the
end. Reports: loadtests/reports/locust_stats.csv (and _failures, _exceptions, _stats_history) and
loadtests/reports/locust.html. Exits non-zero when any request failed.

    python -m loadtests.loadtest [--run-time 60s] [--users 40] [extra locust arguments...]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtests.bench.paths import BIN, REPORTS, ROOT
from loadtests.bench.processes import Proc, free_port, wait_http

READY_TIMEOUT_SECONDS = 180  # a first embedded PostgreSQL initialises its cluster


def run_locust(host: str, args: argparse.Namespace, extra: list[str]) -> int:
    REPORTS.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BIN / "locust"),
        "--config",
        str(ROOT / "loadtests" / "locust.conf"),
        "--headless",
        "--host",
        host,
        "--run-time",
        args.run_time,
        "--users",
        str(args.users),
        "--csv",
        str(REPORTS / "locust"),
        "--html",
        str(REPORTS / "locust.html"),
        "--only-summary",
        *extra,
    ]
    print("loadtest: " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-time", default=os.environ.get("LOADTEST_RUN_TIME", "60s"))
    parser.add_argument("--users", type=int, default=int(os.environ.get("LOADTEST_USERS", "40")))
    args, extra = parser.parse_known_args(argv)
    host = os.environ.get("LOADTEST_HOST")
    if host:
        return run_locust(host, args, extra)

    with tempfile.TemporaryDirectory(prefix="payment-loadtest-") as tmp:
        receiver_port, api_port = free_port(), free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "DB_HOST", "API_KEYS", "API_PREFIX")
        }
        env.update(
            PAYMENT_SERVICE_DATA_DIR=str(Path(tmp) / "data"),
            SERVICE_PORT=str(api_port),
            RELAY_METRICS_PORT=str(free_port()),
            NOTIFICATION_SERVICE_URL=f"http://127.0.0.1:{receiver_port}",
            LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        logs = Path(tmp)
        receiver = Proc(
            "receiver",
            [sys.executable, str(ROOT / "loadtests" / "receiver.py"), "--port", str(receiver_port)],
            env=env,
            logs=logs,
        )
        service = Proc("service", [str(BIN / "payment-service"), "run"], env=env, logs=logs)
        try:
            base = f"http://127.0.0.1:{api_port}"
            wait_http(base + "/health", service, timeout=READY_TIMEOUT_SECONDS)
            code = run_locust(base, args, extra)
        finally:
            # `payment-service run` stops its children and its database on Ctrl-C (SIGINT).
            exit_code = service.stop(signal.SIGINT)
            receiver.stop(signal.SIGTERM)
            if exit_code not in (0, -signal.SIGINT, 130):
                print(
                    f"loadtest: the service exited {exit_code}; its log ends:\n{service.tail(20)}"
                )
    print(
        f"loadtest: reports in {REPORTS}/locust_stats.csv and {REPORTS}/locust.html "
        f"(locust exit code {code})",
        flush=True,
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
