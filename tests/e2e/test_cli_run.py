"""`payment-service run` as a real process: with no database configured it starts an
embedded PostgreSQL under PAYMENT_SERVICE_DATA_DIR, migrates, serves on SERVICE_PORT with the relay
beside it, stops everything on Ctrl-C (SIGINT), and keeps the data across a restart — and the
database's address, which it prints as a line to paste (`export DATABASE_URL=…`)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import asyncpg
import httpx

from payment_service.embedded import EmbeddedPostgres, free_port
from tests.support.commands import run_to_end
from tests.support.database import scratch_dir
from tests.support.environment import clean_env
from tests.support.processes import Service, service
from tests.support.waiting import port_closed, wait_until

# The first start runs initdb; give it time on a slow machine.
START_TIMEOUT_SECONDS = 180
STOP_TIMEOUT_SECONDS = 60


def postgres_stopped(data_dir: Path) -> bool:
    """No server left running on the data directory (pg_ctl removes the pid file on stop)."""
    return not any(data_dir.rglob("postmaster.pid"))


def stop_leftover_postgres(data_dir: Path) -> None:
    for pid_file in data_dir.rglob("postmaster.pid"):
        EmbeddedPostgres(pid_file.parent).stop(mode="immediate")


async def stop_with_ctrl_c(run: Service, port: int, data_dir: Path) -> None:
    code = await run.stop(signal.SIGINT, timeout=STOP_TIMEOUT_SECONDS)
    assert code == 0, run.output()[-4000:]
    assert "Traceback" not in run.output(), run.output()[-4000:]
    assert await port_closed(port)
    assert postgres_stopped(data_dir), "Ctrl-C stops the embedded PostgreSQL too"


def printed_database_url(run: Service) -> str:
    """The DATABASE_URL of the `export DATABASE_URL=…` line `run` printed."""
    found = re.findall(r"^\s*export DATABASE_URL=(\S+)$", run.stderr(), re.M)
    assert len(found) == 1, run.stderr()[-4000:]
    return str(found[0])


async def test_run_with_embedded_database_keeps_data_across_restarts(tmp_path: Path) -> None:
    with scratch_dir("payments-e2e-run-") as scratch:
        await run_twice(tmp_path, scratch / "data")


async def run_twice(tmp_path: Path, data_dir: Path) -> None:
    port = free_port()
    relay_port = free_port()
    env = clean_env(
        PAYMENT_SERVICE_DATA_DIR=str(data_dir),
        SERVICE_PORT=str(port),
        RELAY_METRICS_PORT=str(relay_port),
        NOTIFICATION_SERVICE_URL=f"http://127.0.0.1:{free_port()}",
    )
    base = f"http://127.0.0.1:{port}"
    body = {"idempotency_key": "run-e2e-1", "trip_id": 101, "method": "CARD", "amount": 150.00}
    try:
        with service(["run"], env, tmp_path, "run-1") as run:
            health = await run.wait_http(base + "/health", timeout=START_TIMEOUT_SECONDS)
            assert health.json()["status"] == "healthy"
            # The relay runs beside the API: its metrics endpoint answers.
            await run.wait_http(f"http://127.0.0.1:{relay_port}/metrics", timeout=60)
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                created = await client.post("/payments", json=body)
                assert created.status_code == 200, created.text
                first_answer = created.content
            assert any(data_dir.rglob("PG_VERSION")), "the database lives in the data dir"
            database_url = printed_database_url(run)
            # The printed line reaches the database `run` uses, from another process.
            conn = await asyncpg.connect(database_url)
            try:
                assert await conn.fetchval("SELECT count(*) FROM payments") == 1
            finally:
                await conn.close()
            await stop_with_ctrl_c(run, port, data_dir)

        with service(["run"], env, tmp_path, "run-2") as run:
            await run.wait_http(base + "/health", timeout=START_TIMEOUT_SECONDS)
            assert printed_database_url(run) == database_url, "the same address after a restart"
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                payment_id = json.loads(first_answer)["payment_id"]
                fetched = await client.get(f"/payments/{payment_id}")
                assert fetched.status_code == 200, "the payment survived the restart"
                assert fetched.json()["trip_id"] == 101
                replay = await client.post("/payments", json=body)
                assert replay.content == first_answer, "so did its idempotency record"
                assert replay.headers.get("idempotent-replayed") == "true"
            await stop_with_ctrl_c(run, port, data_dir)
    finally:
        stop_leftover_postgres(data_dir)


async def test_run_refuses_a_port_in_use(tmp_path: Path) -> None:
    import socket

    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = clean_env(PAYMENT_SERVICE_DATA_DIR=str(data_dir), SERVICE_PORT=str(port))
        try:
            with service(["run"], env, tmp_path, "run-busy") as run:

                async def exited() -> bool:
                    return run.process.poll() is not None

                await wait_until(exited, timeout=60, interval=0.1)
                assert run.process.returncode != 0
                assert str(port) in run.stderr()
                assert "Traceback" not in run.stderr()
        finally:
            stop_leftover_postgres(data_dir)


def test_run_names_a_data_directory_it_cannot_use(tmp_path: Path) -> None:
    # A path under a regular file cannot be a directory, whoever runs the command (root too).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file\n")
    data_dir = blocker / "data"
    env = clean_env(PAYMENT_SERVICE_DATA_DIR=str(data_dir), SERVICE_PORT=str(free_port()))

    finished = run_to_end(["run"], env, tmp_path)

    assert finished.returncode == 1, finished.stderr
    assert str(data_dir) in finished.error_lines[-1], finished.stderr
    assert "PAYMENT_SERVICE_DATA_DIR" in finished.error_lines[-1]
    assert "not reachable" not in finished.stderr
    assert "Traceback" not in finished.stderr


def children(pid: int) -> set[int]:
    """The live (or not yet reaped) child processes of `pid`."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:  # the process is gone
        return set()
    return {int(child) for child in text.split()}


def child_running(pid: int, command_word: str) -> int | None:
    for child in children(pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command_word.encode() in argv:
            return child
    return None


async def test_ctrl_c_while_a_child_waits_to_be_restarted_restarts_nothing(
    tmp_path: Path, database_url: str
) -> None:
    port = free_port()
    env = clean_env(
        DATABASE_URL=database_url,
        SERVICE_PORT=str(port),
        RELAY_METRICS_PORT=str(free_port()),
        NOTIFICATION_SERVICE_URL=f"http://127.0.0.1:{free_port()}",
    )
    with service(["run"], env, tmp_path, "run-restart") as run:
        await run.wait_http(f"http://127.0.0.1:{port}/health", timeout=START_TIMEOUT_SECONDS)
        relay = await wait_until(lambda: child_running(run.pid, "relay"), timeout=60)
        os.kill(relay, signal.SIGKILL)
        # The supervisor saw it die and waits RESTART_DELAY_SECONDS before starting another.
        await wait_until(lambda: "relay exited with code -9" in run.stderr(), timeout=30)
        before = children(run.pid)

        run.process.send_signal(signal.SIGINT)
        started_after_ctrl_c: set[int] = set()

        def exited() -> bool:
            started_after_ctrl_c.update(children(run.pid) - before)
            return run.process.poll() is not None

        await wait_until(exited, timeout=STOP_TIMEOUT_SECONDS, interval=0.002)

    assert started_after_ctrl_c == set(), "a child was restarted after Ctrl-C:\n" + run.output()
    assert run.process.returncode == 0, run.output()[-4000:]
    assert "Traceback" not in run.output()


def environment_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(pair.decode().partition("=")[::2] for pair in pairs if pair)


async def test_the_relay_does_not_get_the_apis_metrics_directory(
    tmp_path: Path, database_url: str
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, `run` hands it to the API (its workers share it) and not
    to the relay, which serves its own metrics: no relay metric file lands in the directory."""
    port = free_port()
    relay_port = free_port()
    directory = tmp_path / "api-metrics"
    env = clean_env(
        DATABASE_URL=database_url,
        SERVICE_PORT=str(port),
        RELAY_METRICS_PORT=str(relay_port),
        NOTIFICATION_SERVICE_URL=f"http://127.0.0.1:{free_port()}",
        PROMETHEUS_MULTIPROC_DIR=str(directory),
    )
    with service(["run"], env, tmp_path, "run-metrics-dir") as run:
        await run.wait_http(f"http://127.0.0.1:{port}/health", timeout=START_TIMEOUT_SECONDS)
        relay_metrics = await run.wait_http(f"http://127.0.0.1:{relay_port}/metrics", timeout=60)
        assert "relay_deliveries_total" in relay_metrics.text
        relay = await wait_until(lambda: child_running(run.pid, "relay"), timeout=60)
        api = await wait_until(lambda: child_running(run.pid, "serve"), timeout=60)
        relay_env = environment_of(relay)
        api_env = environment_of(api)
        metric_files = sorted(path.name for path in directory.glob("*.db"))
        code = await run.stop(signal.SIGINT, timeout=STOP_TIMEOUT_SECONDS)
        assert code == 0, run.output()[-4000:]
    assert "PROMETHEUS_MULTIPROC_DIR" not in relay_env
    assert api_env.get("PROMETHEUS_MULTIPROC_DIR") == str(directory)
    assert not [name for name in metric_files if name.endswith(f"_{relay}.db")], metric_files
