"""Compose smoke test: the seed guide's workflow against `docker-compose up`, end to end.

`docker-compose up -d --build` under a project name of its own, configured by a copy of
.env.example with a password and a webhook secret set, every port published on 127.0.0.1 only
(free ports); then: health; create with `demo-client-1`, charged at the compose gateway
(localstripe), whose signed webhook reaches the API; the repeat answers the same body; refund
with `refund-demo-1`, made at the gateway; `reconcile` in the API's container finds no
difference; eight concurrent creates with one key make one payment; the callbacks reach the
notification sink, and to the trip sink (endpoint `trip`, seeded from TRIP_CALLBACK_PATH and
TRIP_EVENT_TYPES); `docker-compose restart` and `down` + `up` keep the data; `down -v` removes
it. The images come from POSTGRES_IMAGE, PYTHON_IMAGE and PAYMENT_SERVICE_IMAGE when set (CI
builds them locally).

Run with `COMPOSE_SMOKE=1 make test PYTEST_ARGS=tests/compose` (needs Docker and docker-compose).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from payment_service.config import Settings
from tests.support import REPO_ROOT
from tests.support.waiting import wait_until

BUILD_TIMEOUT_SECONDS = 900  # the first build on a new machine installs every dependency
COMMAND_TIMEOUT_SECONDS = 180
HEALTHY_TIMEOUT_SECONDS = 180
CALLBACK_TIMEOUT_SECONDS = 60
CONCURRENT_REQUESTS = 8
RUNNING_SERVICES = {"db", "gateway", "api", "relay", "notification-sink", "trip-sink"}

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_SECONDS + 600)

# The seed guide's request bodies, byte for byte (amounts as JSON numbers with two decimals).
SEED_CREATE = (
    '{"idempotency_key": "demo-client-1", "trip_id": 101, "method": "CARD", "amount": 150.00, '
    '"metadata": {"note": "local test"}}'
)
SEED_REFUND = (
    '{"idempotency_key": "refund-demo-1", "amount": 50.00, "metadata": {"reason": "test refund"}}'
)


async def run(command: list[str], *, env: dict[str, str], timeout: float) -> str:
    """Run a command to completion within `timeout` seconds; its output, or a failure naming it."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=REPO_ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"`{shlex.join(command)}` did not finish within {timeout} s") from None
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise AssertionError(
            f"`{shlex.join(command)}` exited {process.returncode}:\n{text[-4000:]}"
        )
    return text


def _compose_command() -> list[str]:
    if configured := os.environ.get("COMPOSE"):
        return shlex.split(configured)
    return ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]


def _an_hour_ago() -> str:
    return (datetime.now(UTC) - timedelta(hours=1)).isoformat()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    env_file: Path
    http: httpx.AsyncClient

    async def compose(self, *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> str:
        command = [
            *_compose_command(),
            "--file", str(REPO_ROOT / "docker-compose.yml"),
            "--project-name", self.project,
            "--env-file", str(self.env_file),
            *args,
        ]  # fmt: skip
        return await run(command, env=self.env, timeout=timeout)

    async def docker(self, *args: str) -> str:
        return await run(["docker", *args], env=self.env, timeout=COMMAND_TIMEOUT_SECONDS)

    async def sql(self, query: str) -> list[str]:
        """Rows of a query run by psql inside the `db` container, one string per row."""
        output = await self.compose(
            "exec", "-T", "db", "psql", "-U", "postgres", "-d", "postgres",
            "-v", "ON_ERROR_STOP=1", "-tAc", query,
        )  # fmt: skip
        return output.splitlines()

    async def post(self, path: str, body: str) -> httpx.Response:
        return await self.http.post(
            path, content=body, headers={"Content-Type": "application/json"}
        )

    async def wait_for(
        self, predicate: Callable[[], Awaitable[bool]], what: str, timeout: float
    ) -> None:
        """Wait until `predicate` holds; a timeout fails with the containers' states and logs."""
        try:
            await wait_until(predicate, timeout=timeout, interval=1.0)
        except AssertionError:
            raise AssertionError(
                f"{what}: not within {timeout} s\n{await self.diagnostics()}"
            ) from None

    async def diagnostics(self) -> str:
        try:
            return await self.compose("ps") + await self.compose(
                "logs", "--no-color", "--tail", "40"
            )
        except AssertionError as error:
            return str(error)

    async def wait_until_healthy(self) -> None:
        async def healthy() -> bool:
            try:
                return (await self.http.get("/health")).status_code == 200
            except httpx.TransportError:
                return False

        await self.wait_for(healthy, "GET /health answering 200", HEALTHY_TIMEOUT_SECONDS)

    async def running_services(self) -> dict[str, str]:
        """What `docker ps` shows for this project: service name → status."""
        output = await self.docker(
            "ps", "--filter", f"label=com.docker.compose.project={self.project}",
            "--format", '{{.Label "com.docker.compose.service"}}\t{{.Status}}',
        )  # fmt: skip
        return dict(line.split("\t", 1) for line in output.splitlines() if line)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    project = f"paymentsmoke{uuid.uuid4().hex[:8]}"
    # As the guide says: `.env` is a copy of .env.example with a password chosen; a copy of our own,
    # so whatever a developer keeps in the checkout's .env plays no part.
    env_file = tmp_path_factory.mktemp("compose") / "smoke.env"
    example = (REPO_ROOT / ".env.example").read_text(encoding="utf-8")
    env_file.write_text(
        f"{example}\nDB_PASS={secrets.token_urlsafe(24)}\n"
        f"STRIPE_WEBHOOK_SECRET=whsec_{secrets.token_urlsafe(24)}\n",
        encoding="utf-8",
    )
    api_port = _free_port()
    # The service's own variables come from that file, not from this shell; only the published
    # ports are moved to free ones, so a developer's own stack can keep 8082.
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    env.update(
        PUBLISH_HOST="127.0.0.1",
        SERVICE_PORT=str(api_port),
        NOTIFICATION_SINK_PORT=str(_free_port()),
        TRIP_SINK_PORT=str(_free_port()),
        DB_PUBLISHED_PORT=str(_free_port()),
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as http:
        stack = Stack(project, env, env_file, http)
        try:
            try:
                await stack.compose("up", "-d", "--build", timeout=BUILD_TIMEOUT_SECONDS)
            except AssertionError as error:
                raise AssertionError(f"{error}\n{await stack.diagnostics()}") from None
            await stack.wait_until_healthy()
            yield stack
        finally:
            await stack.compose("down", "--volumes", "--remove-orphans")
            volumes = await stack.docker(
                "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"
            )
            assert volumes.strip() == "", f"`down -v` left volumes behind: {volumes}"


async def test_every_container_runs_healthy(stack: Stack) -> None:
    async def all_healthy() -> bool:
        services = await stack.running_services()
        return set(services) == RUNNING_SERVICES and all(
            status.startswith("Up") and "(healthy)" in status for status in services.values()
        )

    # The image's HEALTHCHECK (python + urllib on /health; no curl in slim images) makes the API
    # healthy; compose gives the database, the relay and the sink checks of their own.
    await stack.wait_for(all_healthy, "every container up and healthy", HEALTHY_TIMEOUT_SECONDS)
    migrate = await stack.docker(
        "ps", "--all", "--format", "{{.Status}}",
        "--filter", f"label=com.docker.compose.project={stack.project}",
        "--filter", "label=com.docker.compose.service=migrate",
    )  # fmt: skip
    assert migrate.startswith("Exited (0)"), migrate


async def test_seed_workflow(stack: Stack) -> None:
    health = await stack.http.get("/health")
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "healthy"
    assert health.json()["checks"]["database"] == "ok"

    created = await stack.post("/payments", SEED_CREATE)
    assert created.status_code == 200, created.text
    payment = created.json()
    assert payment["status"] == "SUCCESS"
    assert Decimal(str(payment["amount"])) == Decimal("150.00")
    payment_id = payment["payment_id"]
    # Charged at the compose gateway: its intent, and its webhook verified and stored by the API.
    assert payment["gateway_reference"].startswith("pi_"), payment

    async def webhook_stored() -> bool:
        stored = await stack.sql(
            f"SELECT count(*) FROM gateway_events WHERE payment_id = {int(payment_id)}"
        )
        return stored != ["0"]

    await stack.wait_for(
        webhook_stored, "the gateway's webhook at the API", CALLBACK_TIMEOUT_SECONDS
    )

    repeated = await stack.post("/payments", SEED_CREATE)
    assert repeated.status_code == 200, repeated.text
    assert repeated.content == created.content
    assert repeated.headers.get("Idempotent-Replayed") == "true"

    refund = await stack.post(f"/payments/{payment_id}/refunds", SEED_REFUND)
    assert refund.status_code == 200, refund.text
    assert refund.json()["status"] == "REFUNDED"
    assert Decimal(str(refund.json()["refund_amount"])) == Decimal("50.00")
    # Our charges and refunds and the gateway's agree (exit 0), compared inside the API's container.
    report = json.loads(
        await stack.compose(
            "exec", "-T", "api", "payment-service", "reconcile", "--since", _an_hour_ago(), "--json"
        )
    )
    assert report["consistent"] is True, report
    assert report["compared"]["payments"] >= 1 and report["compared"]["refunds"] >= 1, report

    key = f"smoke-concurrent-{uuid.uuid4().hex}"
    body = json.dumps({"idempotency_key": key, "trip_id": 202, "method": "CARD", "amount": "75.25"})
    answers = await asyncio.gather(
        *(stack.post("/payments", body) for _ in range(CONCURRENT_REQUESTS))
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert set(statuses) <= {200, 409} and 200 in statuses, statuses
    assert len({answer.content for answer in answers if answer.status_code == 200}) == 1
    assert await stack.sql("SELECT count(*) FROM payments WHERE trip_id = 202") == ["1"]
    key_rows = await stack.sql(
        "SELECT count(*) FROM idempotency_keys "
        f"WHERE key_hash = encode(sha256(convert_to('{key}', 'UTF8')), 'hex')"
    )
    assert key_rows == ["1"]

    # The relay delivers both events to each sink, which prints each one it receives: the trip
    # sink (endpoint `trip`, seeded at `migrate`) is subscribed to payment.succeeded and
    # payment.refunded, so it gets both as well.
    events = [
        row.split("|")
        for row in await stack.sql(
            "SELECT event_type, event_id FROM outbox_events "
            f"WHERE aggregate_id = {int(payment_id)} ORDER BY id"
        )
    ]
    assert [event_type for event_type, _ in events] == ["payment.succeeded", "payment.refunded"]
    assert await stack.sql(
        "SELECT name || ' ' || url || ' ' || array_to_string(event_types, ',') FROM endpoints "
        "ORDER BY name"
    ) == [
        "notification http://notification-sink:8085/notifications *",
        "trip http://trip-sink:8081/trips/payment-events payment.succeeded,payment.refunded",
    ]

    async def delivered() -> bool:
        deliveries = await stack.sql(
            "SELECT count(*) || ' ' || count(*) FILTER (WHERE status = 'DELIVERED') "
            f"FROM deliveries WHERE aggregate_id = {int(payment_id)}"
        )
        logs = [
            await stack.compose("logs", "--no-color", sink)
            for sink in ("notification-sink", "trip-sink")
        ]
        return deliveries == ["4 4"] and all(
            event_id in log for log in logs for _, event_id in events
        )

    await stack.wait_for(
        delivered, "both callbacks delivered to both sinks", CALLBACK_TIMEOUT_SECONDS
    )
    trip_log = await stack.compose("logs", "--no-color", "trip-sink")
    assert '"sink": "trip"' in trip_log and '"event_type": "payment.succeeded"' in trip_log


async def test_restart_and_recreate_keep_the_data(stack: Stack) -> None:
    key = f"smoke-restart-{uuid.uuid4().hex}"
    body = json.dumps({"idempotency_key": key, "trip_id": 303, "method": "UPI", "amount": "99.50"})
    created = await stack.post("/payments", body)
    assert created.status_code == 200, created.text
    payment_id = created.json()["payment_id"]

    async def still_there() -> None:
        found = await stack.http.get(f"/payments/{payment_id}")
        assert found.status_code == 200, found.text
        assert found.json()["payment_id"] == payment_id
        replay = await stack.post("/payments", body)
        assert replay.status_code == 200, replay.text
        assert replay.content == created.content

    await stack.compose("restart")
    await stack.wait_until_healthy()
    await still_there()

    # Containers removed and made anew: only the named volume carries the data across.
    await stack.compose("down")
    assert await stack.running_services() == {}
    await stack.compose("up", "-d")
    await stack.wait_until_healthy()
    await still_there()
