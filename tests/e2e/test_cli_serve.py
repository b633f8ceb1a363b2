"""`payment-service serve` as a real process: bad configuration refuses to start
with one line naming the variable; a good one serves on the given port and stops cleanly on a
signal."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from payment_service.embedded import free_port
from tests.support.commands import run_to_end
from tests.support.environment import clean_env
from tests.support.metrics import sample_value
from tests.support.processes import service
from tests.support.waiting import port_closed, wait_until

SECRET = "whsec_" + base64.b64encode(b"an-example-key-of-32-bytes-long!").decode()


@pytest.mark.parametrize("subcommand", ["serve", "run", "migrate"])
@pytest.mark.parametrize(
    ("missing", "present"),
    [
        ("API_KEYS", {"CALLBACK_SIGNING_SECRET": SECRET}),
        ("CALLBACK_SIGNING_SECRET", {"API_KEYS": "k1"}),
    ],
)
def test_production_refuses_to_start_without_secrets(
    tmp_path: Path, subcommand: str, missing: str, present: dict[str, str]
) -> None:
    env = clean_env(
        ENVIRONMENT="production",
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/none",
        SERVICE_PORT=str(free_port()),
        PAYMENT_SERVICE_DATA_DIR=str(tmp_path / "data"),
        **present,
    )
    result = run_to_end([subcommand], env, tmp_path, timeout=60)

    assert result.returncode != 0
    assert len(result.error_lines) == 1, result.stderr
    assert missing in result.error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists(), "refused before doing anything"


@pytest.mark.parametrize("subcommand", ["serve", "migrate"])
def test_no_database_is_one_clear_line(tmp_path: Path, subcommand: str) -> None:
    result = run_to_end([subcommand], clean_env(), tmp_path, timeout=60)
    assert result.returncode != 0
    assert len(result.error_lines) == 1, result.stderr
    assert "DATABASE_URL" in result.error_lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [("SERVICE_PORT", "not-a-port"), ("API_PREFIX", "v1"), ("ASYNC_METHODS", "BITCOIN")],
)
def test_bad_value_is_one_line_naming_the_variable(
    tmp_path: Path, database_url: str, variable: str, value: str
) -> None:
    env = clean_env(DATABASE_URL=database_url, **{variable: value})
    result = run_to_end(["serve", "--host", "127.0.0.1"], env, tmp_path, timeout=60)
    assert result.returncode != 0
    assert len(result.error_lines) == 1, result.stderr
    assert variable in result.error_lines[0]


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = run_to_end(["--help"], clean_env(), tmp_path, timeout=30)
    assert result.returncode == 0
    for name in ("run", "serve", "migrate", "relay", "outbox", "notification-sink"):
        assert name in result.stdout
    for name in ("run", "serve", "migrate"):
        assert run_to_end([name, "--help"], clean_env(), tmp_path, timeout=30).returncode == 0


@pytest.mark.parametrize("server", [None, "hypercorn"], ids=["default", "hypercorn"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_serve_answers_and_stops_cleanly(
    tmp_path: Path, database_url: str, sig: signal.Signals, server: str | None
) -> None:
    port = free_port()
    env = clean_env(DATABASE_URL=database_url, API_PREFIX="/v1", LOG_LEVEL="INFO")
    args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--server", server] if server else []
    with service(args, env, tmp_path, "serve") as api:
        base = f"http://127.0.0.1:{port}"
        health = await api.wait_http(base + "/health", timeout=60)
        assert health.json()["checks"]["database"] == "ok"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            created = await client.post(
                "/v1/payments",
                json={"idempotency_key": "e2e-1", "trip_id": 1, "method": "CARD", "amount": "5.00"},
            )
            assert created.status_code == 200, created.text

        code = await api.stop(sig, timeout=30)

        assert code == 0, api.output()[-3000:]
        assert "Traceback" not in api.output()
        assert await port_closed(port)
        # Logs are JSON lines on stdout, one of them the access log of that request; none
        # carries a terminal's colour codes (Uvicorn hands its records a `color_message`).
        stdout = api.stdout_path.read_text()
        lines = [line for line in stdout.splitlines() if line.strip()]
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert records, "JSON logs on stdout"
        assert any("/v1/payments" in json.dumps(record) for record in records)
        assert "\x1b" not in stdout and "\\u001b" not in stdout, stdout[:2000]


async def fresh_connection(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request on a connection of its own, so that any worker may accept it."""
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        return await client.request(method, url, **kwargs)


async def create_payments(base: str, count: int, prefix: str, *, first_trip: int = 100) -> None:
    for n in range(count):
        response = await fresh_connection(
            "POST",
            base + "/payments",
            json={"idempotency_key": f"{prefix}-{n}", "trip_id": first_trip + n,
                  "method": "CARD", "amount": "1.00"},
        )  # fmt: skip
        assert response.status_code == 200, response.text


async def assert_every_scrape_counts(base: str, payments: int, *, scrapes: int = 6) -> None:
    """Each scrape (whichever worker answers it) counts every worker's payments and requests."""
    for _ in range(scrapes):
        text = (await fresh_connection("GET", base + "/metrics")).text
        assert sample_value(text, "payment_payments_created_total") == payments, text
        posts = sample_value(
            text, "payment_api_requests_total", route="/payments", method="POST", status="200"
        )
        assert posts == payments, text
        latencies = sample_value(
            text, "payment_api_request_duration_seconds_count", route="/payments", method="POST"
        )
        assert latencies == payments, text


@pytest.mark.parametrize("server", ["hypercorn", "uvicorn"])
async def test_serve_with_workers(tmp_path: Path, database_url: str, server: str) -> None:
    """Two workers serve, every scrape of /metrics adds both up, and the metrics directory that
    `serve` made for them is gone after it stops."""
    port = free_port()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
            "--server", server]  # fmt: skip
    env = clean_env(DATABASE_URL=database_url, TMPDIR=scratch)
    with service(args, env, tmp_path, "serve") as api:
        base = f"http://127.0.0.1:{port}"
        await api.wait_http(base + "/health", timeout=60)
        await create_payments(base, 10, "w")
        await assert_every_scrape_counts(base, 10)
        assert list(scratch.glob("payment-service-metrics-*")), "serve made its directory"
        assert await api.stop(signal.SIGTERM, timeout=30) == 0
        await wait_until(lambda: port_closed(port), timeout=10)
    assert not list(scratch.glob("payment-service-metrics-*")), "and removed it"


async def test_a_configured_metrics_directory_is_wiped_at_start(
    tmp_path: Path, database_url: str
) -> None:
    """PROMETHEUS_MULTIPROC_DIR is honoured, but a second `serve` does not count the first's."""
    directory = tmp_path / "metrics"
    env = clean_env(DATABASE_URL=database_url, PROMETHEUS_MULTIPROC_DIR=directory)
    for run, payments in enumerate((3, 2)):
        port = free_port()
        args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
        with service(args, env, tmp_path, f"serve-{run}") as api:
            base = f"http://127.0.0.1:{port}"
            await api.wait_http(base + "/health", timeout=60)
            await create_payments(base, payments, f"run-{run}", first_trip=100 * (run + 1))
            await assert_every_scrape_counts(base, payments, scrapes=3)
            assert list(directory.glob("*.db")), "the workers' files are in the directory"
            assert await api.stop(signal.SIGTERM, timeout=30) == 0
    assert directory.is_dir(), "a configured directory is kept"


async def test_serve_refuses_a_database_without_the_schema(
    tmp_path: Path, empty_database_url: str
) -> None:
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with service(args, clean_env(DATABASE_URL=empty_database_url), tmp_path, "serve") as api:

        async def exited() -> bool:
            return api.process.poll() is not None

        await wait_until(exited, timeout=60, interval=0.1)
        assert api.process.returncode != 0
        assert "migrate" in api.output(), api.output()[-3000:]


@pytest.mark.parametrize("server", ["hypercorn", "uvicorn"])
async def test_workers_do_not_outlive_a_killed_serve(
    tmp_path: Path, database_url: str, server: str
) -> None:
    """kill -9 of `serve --workers 2` itself: its workers stop too, not serve on as orphans."""
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
            "--server", server]  # fmt: skip
    with service(args, clean_env(DATABASE_URL=database_url), tmp_path, "serve") as api:
        try:
            await api.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
            os.kill(api.pid, signal.SIGKILL)
            api.process.wait(timeout=10)
            # Orphaned workers would keep the port open and answering.
            await wait_until(lambda: port_closed(port), timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(api.pid, signal.SIGKILL)  # the session's leftovers, if the test failed


@pytest.mark.parametrize("server", ["hypercorn", "uvicorn"])
async def test_the_last_access_log_line_is_written_when_serve_stops(
    tmp_path: Path, database_url: str, server: str
) -> None:
    """The access log is written by a thread (payment_service/logs.py): SIGTERM right after the
    last answer still leaves every request's JSON line on stdout, the last one included."""
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--server", server]
    env = clean_env(DATABASE_URL=database_url, LOG_LEVEL="INFO")
    with service(args, env, tmp_path, "serve") as api:
        base = f"http://127.0.0.1:{port}"
        await api.wait_http(base + "/health", timeout=60)
        sent = [f"last-line-{n}" for n in range(200)]
        async with httpx.AsyncClient(base_url=base, timeout=10, trust_env=False) as client:
            for request_id in sent:
                response = await client.get("/payments/1", headers={"X-Request-ID": request_id})
                assert response.status_code == 404, response.text

        assert await api.stop(signal.SIGTERM, timeout=30) == 0, api.output()[-3000:]

    records = [
        json.loads(line)
        for line in api.stdout_path.read_text().splitlines()
        if line.startswith("{")
    ]
    logged = [r["request_id"] for r in records if r.get("logger") == "payment_service.access"]
    assert logged[-len(sent) :] == sent, "every line, in order, the last one included"
    assert logged[-1] == sent[-1]
