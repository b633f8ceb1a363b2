"""Fixtures of the fault tests: each test owns a PostgreSQL, a receiver and the service's processes.

- `fault_db`: an embedded PostgreSQL of the test's own (data outside pytest's basetemp),
  migrated; the test may stop and start it. It is not the session's shared server.
- `receiver`: a `CallbackReceiver` on 127.0.0.1 that the relay posts to (signatures verified).
- `stack`: starts `payment-service serve` / `relay` processes against both; at the end every
  process is stopped and the tail of each log is printed (pytest shows it when the test failed).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from payment_service.embedded import free_port
from tests.faults.harness import (
    ApiProcess,
    FaultDatabase,
    ServiceProcess,
    new_signing_secret,
    run_check,
    service_environment,
)
from tests.faults.receiver import CallbackReceiver

# The settings every process of a fault test runs with; a test overrides what it exercises.
BASE_ENVIRONMENT: dict[str, object] = {
    "ENVIRONMENT": "test",
    "LOG_LEVEL": "WARNING",
    "ASYNC_METHODS": "UPI",
    "IDEMPOTENCY_KEY_TTL": 86400,
    "DB_POOL_MIN": 1,
    "DB_POOL_MAX": 6,
    "RELAY_POLL_INTERVAL": 0.5,
    "RELAY_REQUEST_TIMEOUT": 10,
    "RELAY_LEASE_SECONDS": 15,
    "RELAY_METRICS_PORT": 0,
    # A failed delivery is retried after 1 s, then 2 s, … instead of 5 s, 30 s, …: the faults are
    # short, and a test should not wait half a minute for the second try.
    "RELAY_RETRY_SCHEDULE": "1,2,4",
}


class ServiceStack:
    """The service's processes of one test, all pointed at its database and receiver."""

    def __init__(self, db: FaultDatabase, receiver: CallbackReceiver, workdir: Path) -> None:
        self.db = db
        self.receiver = receiver
        self.workdir = workdir
        self.secret = new_signing_secret()
        receiver.secret = self.secret
        self.processes: list[ServiceProcess] = []

    def env(self, **overrides: object) -> dict[str, str]:
        variables: dict[str, Any] = {
            **BASE_ENVIRONMENT,
            "DATABASE_URL": self.db.dsn,
            "NOTIFICATION_SERVICE_URL": self.receiver.url,
            "CALLBACK_SIGNING_SECRET": self.secret,
        }
        variables.update({name.upper(): value for name, value in overrides.items()})
        return service_environment(**variables)

    async def api(self, name: str = "api", *, workers: int = 2, **env: object) -> ApiProcess:
        process = ApiProcess(name, self.env(**env), self.workdir, workers=workers)
        self.processes.append(process)
        process.start()
        await process.wait_ready()
        return process

    def relay(self, name: str = "relay", **env: object) -> ServiceProcess:
        process = ServiceProcess(name, ["relay"], self.env(**env), self.workdir)
        self.processes.append(process)
        process.start()
        return process

    async def check(self) -> dict[str, Any]:
        """`payment-service check --json` must pass; returns its report."""
        return await run_check(self.env(), self.workdir)

    async def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(Exception):
                await process.terminate()

    def print_logs(self) -> None:
        for process in self.processes:
            print(
                f"==== {process.name} (pid {process.pid if process.process else '-'}, "
                f"started {process.starts}x) — last lines of {process.log_path}"
            )
            print(process.log_tail(30))


@pytest.fixture
async def fault_db() -> AsyncIterator[FaultDatabase]:
    # Not under pytest's basetemp: the server runs as an unprivileged user when the tests run as
    # root and must traverse every folder above its data, and another pytest session on the
    # machine re-tightens the permissions of /tmp/pytest-of-<user>.
    base = Path(tempfile.mkdtemp(prefix="payments-faults-pg-"))
    db = FaultDatabase(base / "pgdata")
    try:
        await db.create()
        yield db
    finally:
        await db.stop(immediate=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def receiver() -> AsyncIterator[CallbackReceiver]:
    receiver = CallbackReceiver(port=free_port())
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


@pytest.fixture
async def stack(
    fault_db: FaultDatabase, receiver: CallbackReceiver, tmp_path: Path
) -> AsyncIterator[ServiceStack]:
    services = ServiceStack(fault_db, receiver, tmp_path)
    try:
        yield services
    finally:
        await services.close()
        services.print_logs()
