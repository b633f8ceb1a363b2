"""Prometheus's own binaries in the tests (Debian's `prometheus` package: promtool, prometheus).

`PrometheusServer` runs a real Prometheus for a test. Without the binaries a test is skipped,
naming the package, unless REQUIRE_PROMETHEUS=1 (set by .ci/run, which installs the package): then
their absence fails, so CI never skips these tests silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from payment_service.embedded import free_port
from tests.support.waiting import wait_for

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


class PrometheusServer:
    """A real `prometheus` on 127.0.0.1 scraping `targets` ({job: "host:port"}) every second,
    its data in `workdir`, its output in a file; stopped by its PID."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    prometheus_binary("prometheus"),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def query(self, client: httpx.AsyncClient, promql: str) -> list[dict[str, Any]]:
        """The result of an instant query (a vector's samples); [] while Prometheus is not up."""
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_tail()}")
        try:
            response = await client.get(self.base_url + "/api/v1/query", params={"query": promql})
        except httpx.TransportError:
            return []
        if response.status_code != 200:
            return []
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    async def value(self, client: httpx.AsyncClient, promql: str) -> float | None:
        """The single value a query answers, or None (no sample yet)."""
        result = await self.query(client, promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    async def wait_value(
        self, client: httpx.AsyncClient, promql: str, expected: float, *, timeout: float = 60
    ) -> None:
        """Until `promql` answers `expected`; the assertion names the last answer."""
        last: list[float | None] = [None]

        async def answered() -> bool:
            last[0] = await self.value(client, promql)
            return last[0] == expected

        try:
            await wait_for(answered, timeout=timeout, what=f"{promql} == {expected}")
        except AssertionError as error:
            raise AssertionError(f"{error}; last answer {last[0]}\n{self.log_tail()}") from None

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
