"""The service's processes in the tests: started with a clean environment, output to files (never
a pipe that can fill up), stopped with real signals by PID, waited for with deadlines.

- `Service` / `service(...)`: a long-running `payment-service ARGS` in its own session, stdout and
  stderr in files (the CLI tests);
- `ServiceProcess` / `ApiProcess`: `payment-service ARGS` in its own process group with one log,
  killed or terminated group-wide (the fault tests);
- `RelayProcess` / `RelayLauncher` (`relays` fixture): relays logging JSON lines to a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from payment_service.embedded import free_port
from tests.support.commands import module_command, service_command
from tests.support.environment import relay_env
from tests.support.receiver import Receiver
from tests.support.waiting import wait_for

START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 30


class Service:
    """A long-running `payment-service` process in its own session, its output in files."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, name: str) -> None:
        self.stdout_path = cwd / f"{name}.stdout"
        self.stderr_path = cwd / f"{name}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                service_command(*args),
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait_http(self, url: str, *, timeout: float, status: int = 200) -> httpx.Response:
        """Wait until `url` answers `status`; fail at once if the process exits first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"exited with {self.process.returncode} before {url} answered:\n"
                        + self.output()[-4000:]
                    )
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get(url)
                    if response.status_code == status:
                        return response
                if loop.time() > deadline:
                    raise AssertionError(f"{url} did not answer {status} within {timeout} s:\n"
                                         + self.output()[-4000:])  # fmt: skip
                await asyncio.sleep(0.1)

    async def stop(self, sig: signal.Signals = signal.SIGINT, *, timeout: float = 60) -> int:
        """Send `sig` to this process (by PID) and wait for it to exit; its return code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.process.poll() is None:
            if loop.time() > deadline:
                raise AssertionError(
                    f"did not exit within {timeout} s of {sig.name}:\n" + self.output()[-4000:]
                )
            await asyncio.sleep(0.05)
        return self.process.returncode

    def kill_leftovers(self) -> None:
        """Last-resort cleanup: kill this process's own session (its children), by its id."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@contextlib.contextmanager
def service(args: list[str], env: dict[str, str], cwd: Path, name: str) -> Iterator[Service]:
    proc = Service(args, env, cwd, name)
    try:
        yield proc
    finally:
        if proc.process.poll() is None:
            proc.kill_leftovers()


class ServiceProcess:
    """One `payment-service …` process (and its children) in its own process group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.name} is running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"---- start #{self.starts}: {' '.join(self.args)}\n".encode())
            log.flush()
            # cwd is the test's folder: no .env of the developer's is read.
            self.process = subprocess.Popen(
                service_command(*self.args),
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def kill9(self) -> None:
        """SIGKILL the whole process group (server and workers), as a crash or OOM kill would."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait, STOP_TIMEOUT_SECONDS)
        await self._wait_group_gone()

    async def terminate(self) -> int | None:
        """SIGTERM and wait for a clean exit; SIGKILL at the deadline. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                await self.kill9()
                return None
        code = self.process.returncode
        # Workers of a multi-process server may outlive the parent by a moment.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        await self._wait_group_gone()
        return code

    async def _wait_group_gone(self) -> None:
        assert self.process is not None
        pgid = self.process.pid

        def gone() -> bool:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return True
            return False

        await wait_for(gone, timeout=STOP_TIMEOUT_SECONDS, what=f"{self.name}'s processes to exit")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ApiProcess(ServiceProcess):
    """`payment-service serve --workers N --host 127.0.0.1 --port P`."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path, *, workers: int) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "--workers", str(workers), "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(name, args, env, workdir)

    async def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Until /health answers 200 (every worker shares the socket; one answering suffices)."""
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as client:

            async def healthy() -> bool:
                if not self.running():
                    raise AssertionError(f"{self.name} exited:\n{self.log_tail()}")
                try:
                    return (await client.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(healthy, timeout=timeout, what=f"{self.name} to answer /health")


@dataclass
class RelayProcess:
    """A relay running as a real process."""

    env: dict[str, str]
    log_path: Path
    command: list[str] = field(default_factory=lambda: module_command("outbox_relay"))
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.log_path.parent,  # no developer .env is read
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def send(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    async def wait_exit(self, timeout: float) -> int:
        """The exit code; fails if the process is still running after `timeout` seconds."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"relay {self.pid} still running after {timeout} s")
            await asyncio.sleep(0.02)
        return code

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                records.append({"msg": line, "level": "RAW"})
        return records

    def logged(self, message: str) -> int:
        return sum(1 for record in self.log_records() if record.get("msg") == message)

    def ensure_stopped(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class RelayLauncher:
    """Starts relay processes for one test and kills any left running at its end."""

    def __init__(self, tmp_path: Path, database_url: str, receiver: Receiver) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.receiver = receiver
        self.started: list[RelayProcess] = []

    def start(self, *, command: list[str] | None = None, **overrides: object) -> RelayProcess:
        env = relay_env(self.database_url, self.receiver.base_url, **overrides)
        log_path = self.tmp_path / f"relay-{len(self.started)}.log"
        relay = RelayProcess(env, log_path)
        if command is not None:
            relay.command = command
        self.started.append(relay.start())
        return relay

    def stop_all(self) -> None:
        for relay in self.started:
            relay.ensure_stopped()


def dump_logs(relays: list[RelayProcess], limit: int = 40) -> str:
    """The last log lines of each relay, for an assertion message."""
    parts = []
    for relay in relays:
        lines = relay.log_path.read_text(errors="replace").splitlines()[-limit:]
        parts.append(f"--- {relay.log_path.name} (pid {relay.pid})\n" + "\n".join(lines))
    return "\n".join(parts)


@pytest.fixture(name="relays")
def relays_fixture(
    tmp_path: Path, database_url: str, receiver: Receiver
) -> Iterator[RelayLauncher]:
    """Starts relay processes against this test's database and receiver; kills leftovers."""
    launcher = RelayLauncher(tmp_path, database_url, receiver)
    try:
        yield launcher
    finally:
        launcher.stop_all()
