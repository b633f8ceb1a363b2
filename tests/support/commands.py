"""The command lines the tests run, built in one place, and running one to its end.

`service_command` is `payment-service ARGS` from this virtualenv (its console script, or
`python -m payment_cli.cli` where the script is missing); `module_command` runs a module of ours
directly (`python -m outbox_relay`). Output goes to pipes only for commands that end by themselves.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.environment import minimal_environment

CHECK_TIMEOUT_SECONDS = 60


def module_command(module: str, *args: str) -> list[str]:
    """`python -m MODULE ARGS` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def service_command(*args: str) -> list[str]:
    """`payment-service ARGS` from this virtualenv."""
    script = Path(sys.executable).with_name("payment-service")
    if script.exists():
        return [str(script), *args]
    return module_command("payment_cli.cli", *args)


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_to_end(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> Finished:
    """Run `payment-service ARGS` until it exits; its exit code and output."""
    result = subprocess.run(
        service_command(*args), env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    return Finished(result.returncode, result.stdout, result.stderr)


def outbox_command(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `payment-service outbox ARGS…` against a database; the finished process."""
    return subprocess.run(
        service_command("outbox", *args),
        env=minimal_environment(database_url=database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def run_check(env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Run `payment-service check --json`; return its report, asserting exit 0 = consistent."""
    process = await asyncio.create_subprocess_exec(
        *service_command("check", "--json"),
        env=env,
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), CHECK_TIMEOUT_SECONDS)
    assert process.returncode in (0, 1), f"check failed to run: {err.decode()[-2000:]}"
    report: dict[str, Any] = json.loads(out)
    failed = [check for check in report["checks"] if not check["ok"]]
    assert process.returncode == 0 and report["consistent"] and not failed, (
        "payment-service check found inconsistencies:\n" + json.dumps(failed, indent=2)
    )
    return report
