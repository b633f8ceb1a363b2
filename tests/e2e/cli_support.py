"""Running `payment-service` as a real process for the CLI tests: a clean environment, output to
files (never a pipe that can fill up), waits on conditions with deadlines, signals by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from payment_service.config import Settings

# Every variable the service reads; none may leak in from the shell running the tests.
CONFIG_VARIABLES = {name.upper() for name in Settings.model_fields} | {"MIGRATIONS_DIR"}


def command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("payment-service")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "payment_cli.cli", *args]


def clean_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in CONFIG_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(variables)
    return env


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_to_end(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> Finished:
    result = subprocess.run(
        command(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    return Finished(result.returncode, result.stdout, result.stderr)


class Service:
    """A long-running `payment-service` process in its own session, its output in files."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, name: str) -> None:
        self.stdout_path = cwd / f"{name}.stdout"
        self.stderr_path = cwd / f"{name}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                command(*args), env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True
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


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A folder outside pytest's basetemp, removed afterwards.

    An embedded PostgreSQL runs as an unprivileged user when the tests run as root, and must
    traverse every folder above its data; another pytest session on the machine re-tightens the
    permissions of /tmp/pytest-of-<user> (and prunes old basetemps), so data lives elsewhere.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def port_closed(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False
