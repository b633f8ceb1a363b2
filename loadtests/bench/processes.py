"""Child processes stopped by PID, readiness waits, and CPU accounting from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .paths import ROOT

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 20


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process, None when it is gone.

    The seconds include its children that it has waited for (cutime/cstime), so the work of a
    PostgreSQL backend that has exited still counts under the postmaster.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return int(fields[1]), ticks / CLOCK_TICKS


def descendants(root: int) -> set[int]:
    """The process and all its descendants (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_busy_seconds() -> float:
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in parts[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class CpuMeter:
    """CPU cores used by named process groups (and by everything else) over an interval."""

    def __init__(self, groups: dict[str, Callable[[], set[int]]]) -> None:
        self.groups = groups

    def _sample(self) -> dict[str, dict[int, float]]:
        sample: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            sample[name] = {}
            for pid in pids():
                stat = _proc_stat(pid)
                if stat is not None:
                    sample[name][pid] = stat[1]
        return sample

    def __enter__(self) -> CpuMeter:
        self.started = time.monotonic()
        self.machine_before = _machine_busy_seconds()
        self.before = self._sample()
        self.cores: dict[str, float] = {}
        return self

    def __exit__(self, *_: object) -> None:
        after = self._sample()
        elapsed = max(time.monotonic() - self.started, 1e-9)
        ours = 0.0
        for name, pids in after.items():
            used = sum(seconds - self.before[name].get(pid, 0.0) for pid, seconds in pids.items())
            self.cores[name] = used / elapsed
            ours += used
        self.elapsed = elapsed
        self.ours = ours
        self.machine = _machine_busy_seconds() - self.machine_before
        self.cores["machine"] = self.machine / elapsed
        self.cores["other"] = max(self.machine - ours, 0.0) / elapsed

    def add(self, name: str, cpu_seconds: float) -> None:
        """Account a process measured by other means (a child that has exited)."""
        self.ours += cpu_seconds
        self.cores[name] = cpu_seconds / self.elapsed
        self.cores["other"] = max(self.machine - self.ours, 0.0) / self.elapsed


def idle_cores(groups: dict[str, Callable[[], set[int]]], seconds: float) -> dict[str, float]:
    """CPU cores the groups use over `seconds` while nothing loads them (their fixed costs)."""
    with CpuMeter(groups) as meter:
        time.sleep(seconds)  # the measured window itself, not a wait for a condition
    return meter.cores


class Proc:
    """A child process in its own session, output to a log file, stopped by its PID."""

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> set[int]:
        return descendants(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} (pid {self.pid}) did not stop in time: SIGKILL", flush=True)
        # Its session's process group is ours alone (start_new_session): sweep what is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def wait_http(url: str, proc: Proc, timeout: float = READY_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # only 127.0.0.1
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not answer {url} within {timeout} s:\n{proc.tail()}")


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # only 127.0.0.1
        return json.loads(response.read())


def free_port() -> int:
    from payment_service.embedded import free_port as _free

    return _free()


def fmt_cpu(cores: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.2f}" for name, value in cores.items())
