"""The machinery of the fault tests: the service's processes of one test (`ServiceStack`), a load
generator of retrying clients, and the assertions every fault test ends with. The PostgreSQL a
test can stop, the processes and the receiver are in tests/support.

Every fault test runs with two endpoints: `notification`, seeded by the relay from
the settings, and `trip`, added before any process starts, each with its own receiver and secret.
Both subscribe to every event type, so every event must reach both, in order per (endpoint,
payment), signed with that endpoint's secret.

Everything waits on conditions with deadlines; nothing sleeps to let something happen. The only
sleeps are a client's pause between retries (what a real client does) and the receiver's stall.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from payment_service.endpoints import insert_endpoint
from tests.support.api import ADMIN_AUTH, ADMIN_KEYS, key_hash
from tests.support.audit import OPERATOR
from tests.support.commands import run_check
from tests.support.database import DELIVERY_ROWS, OWN_DATABASE_NAME, FaultDatabase
from tests.support.environment import clean_env, new_signing_secret
from tests.support.processes import ApiProcess, ServiceProcess
from tests.support.receiver import Receiver
from tests.support.waiting import wait_for

# A client waits this long for an answer. The API must answer every request well within it, even
# with its database down, so a client timeout counts as a hang and fails the test.
CLIENT_TIMEOUT_SECONDS = 20.0
# How long one operation keeps retrying with its key before the generator gives up on it.
OPERATION_DEADLINE_SECONDS = 150.0


# -- the service's processes of one test ---------------------------------------------------------
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
    # Likewise an endpoint's breaker, once open, probes after 2 s rather than 30 s.
    "ENDPOINT_BREAKER_COOLDOWN_SECONDS": 2,
    # Asynchronous payments are settled by an operator (the admin API).
    "ADMIN_API_KEYS": ",".join(ADMIN_KEYS),
}


class ServiceStack:
    """The service's processes of one test, all pointed at its database and receiver."""

    def __init__(self, db: FaultDatabase, receiver: Receiver, workdir: Path) -> None:
        self.db = db
        self.receiver = receiver
        self.workdir = workdir
        self.secret = new_signing_secret()
        receiver.secret = self.secret
        # Endpoint name -> the receiver it delivers to; `notification` is seeded from the settings.
        self.endpoints: dict[str, Receiver] = {"notification": receiver}
        self.processes: list[ServiceProcess] = []

    async def subscribe(self, name: str, receiver: Receiver) -> None:
        """Add endpoint `name` for every event type, delivering to `receiver` and signed with a
        secret of its own (the receiver checks each callback's signature with it)."""
        receiver.secret = new_signing_secret()
        conn = await self.db.connect()
        try:
            await insert_endpoint(
                conn,
                name=name,
                url=receiver.base_url + receiver.path,
                secret=receiver.secret,
                operator=OPERATOR,
            )
        finally:
            await conn.close()
        self.endpoints[name] = receiver

    def env(self, **overrides: object) -> dict[str, str]:
        variables: dict[str, Any] = {
            **BASE_ENVIRONMENT,
            "DATABASE_URL": self.db.dsn,
            "NOTIFICATION_SERVICE_URL": self.receiver.base_url,
            "CALLBACK_SIGNING_SECRET": self.secret,
        }
        variables.update({name.upper(): value for name, value in overrides.items()})
        return clean_env(**variables)

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


def socket_owner(client_port: int, server_port: int, processes: dict[str, int]) -> str | None:
    """The name of the process (among `processes`: name -> pid) that owns the TCP connection
    127.0.0.1:client_port -> 127.0.0.1:server_port, found through /proc (Linux)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if local_port == client_port and remote_port == server_port:
            inode = fields[9]
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for name, pid in processes.items():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return name
    return None


async def connections_by_process(db: FaultDatabase, processes: dict[str, int]) -> Counter[str]:
    """How many connections each of `processes` (name -> pid) holds to the test's database."""
    rows = await db.fetch(
        "SELECT client_port FROM pg_stat_activity "
        "WHERE datname = $1 AND client_port IS NOT NULL AND pid <> pg_backend_pid()",
        OWN_DATABASE_NAME,
    )
    port = db.server.port
    assert port is not None
    return Counter(socket_owner(row["client_port"], port, processes) or "other" for row in rows)


# -- the load generator --------------------------------------------------------------------------
@dataclass
class Answer:
    """One attempt of a request: the status, or the transport error that replaced it."""

    sent_at: float
    received_at: float
    base_url: str
    status: int | None = None
    error: str | None = None  # the httpx exception class when there was no answer
    code: str | None = None  # problem+json `code`
    retry_after: str | None = None

    @property
    def timed_out(self) -> bool:
        return self.error is not None and "Timeout" in self.error


@dataclass
class Operation:
    kind: str  # create | settle | refund
    key: str
    path: str
    body: dict[str, Any]
    answers: list[Answer] = field(default_factory=list)
    final: Answer | None = None
    response: dict[str, Any] | None = None

    @property
    def succeeded(self) -> bool:
        return self.final is not None and self.final.status is not None and self.final.status < 300


def _definitive(status: int, code: str | None) -> bool:
    """A final answer for the key; anything else is retried with the same key."""
    if status < 300:
        return True
    if status in (408, 429) or status >= 500:
        return False
    return not (status == 409 and code == "IDEMPOTENCY_KEY_IN_PROGRESS")


async def finish_clients(
    tasks: list[asyncio.Task[None]], http: httpx.AsyncClient | None, timeout: float
) -> None:
    """Wait for the clients' tasks (told to stop) to end, each error raised; close their HTTP
    client."""
    try:
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()
        assert not pending, f"{len(pending)} client(s) still busy after {timeout} s"
    finally:
        if http is not None:
            await http.aclose()


class LoadGenerator:
    """Virtual clients that charge trips, settle asynchronous payments and refund some of them.

    Each request is retried with its idempotency key until it gets a definitive answer (a 2xx or a
    business 4xx), whatever happens to the API or the database, the way the seed guide tells
    clients to behave. With several base URLs, each attempt goes to the next one: a retry may
    reach another API process. `stop()` lets every client finish the flow it is in.
    """

    def __init__(
        self,
        base_urls: list[str],
        *,
        clients: int = 6,
        seed: int = 6,
        async_method: str = "UPI",
        max_flows: int = 5000,
    ) -> None:
        self.base_urls = base_urls
        self.clients = clients
        self.seed = seed
        self.async_method = async_method
        self.max_flows = max_flows
        self.operations: list[Operation] = []
        self._urls = itertools.cycle(base_urls)
        self._trips = itertools.count(1)
        self._flows = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None
        self._run_id = os.urandom(4).hex()

    # -- control ------------------------------------------------------------------------------
    def start(self) -> None:
        self._http = httpx.AsyncClient(
            timeout=CLIENT_TIMEOUT_SECONDS,
            limits=httpx.Limits(
                max_connections=self.clients * 2, max_keepalive_connections=self.clients * 2
            ),
        )
        self._tasks = [
            asyncio.create_task(
                self._client(random.Random(self.seed * 1000 + n)), name=f"client-{n}"
            )
            for n in range(self.clients)
        ]

    def stop(self) -> None:
        self._stop.set()

    async def finish(self, timeout: float = OPERATION_DEADLINE_SECONDS + 30) -> None:
        """Stop starting flows and wait for the ones in progress to get their answers."""
        self.stop()
        await finish_clients(self._tasks, self._http, timeout)

    # -- what the tests read ------------------------------------------------------------------
    def successes(self) -> int:
        return sum(op.succeeded for op in self.operations)

    def answers(self) -> Iterable[tuple[Operation, Answer]]:
        for op in self.operations:
            for answer in op.answers:
                yield op, answer

    def status_counts(self) -> Counter[str]:
        return Counter(
            str(answer.status) if answer.status is not None else answer.error or "?"
            for _, answer in self.answers()
        )

    # -- the clients --------------------------------------------------------------------------
    async def _client(self, rng: random.Random) -> None:
        while not self._stop.is_set() and self._flows < self.max_flows:
            self._flows += 1
            await self._flow(rng)

    async def _flow(self, rng: random.Random) -> None:
        trip = self.seed * 10_000_000 + next(self._trips)
        asynchronous = rng.random() < 0.3
        amount = Decimal(rng.randint(100, 99_999)) / 100
        prefix = f"{self._run_id}-{trip}"
        create = await self._request(
            "create",
            f"{prefix}-charge",
            "/payments",
            {
                "trip_id": trip,
                "method": self.async_method if asynchronous else "CARD",
                "amount": str(amount),
                "metadata": {"flow": prefix},
            },
        )
        if not create.succeeded:
            return
        assert create.response is not None
        payment_id = create.response["payment_id"]
        status = create.response["status"]
        if status == "PENDING":
            outcome = "SUCCESS" if rng.random() < 0.75 else "FAILED"
            settle = await self._request(
                "settle",
                f"{prefix}-settle",
                f"/admin/payments/{payment_id}/settlement",
                {"status": outcome, "gateway_reference": f"gw-{prefix}"},
            )
            if not settle.succeeded:
                return
            status = outcome
        if status != "SUCCESS" or rng.random() < 0.4:
            return
        part = (amount / 3).quantize(Decimal("0.01"))
        if part > 0 and rng.random() < 0.6:
            refund = await self._request(
                "refund",
                f"{prefix}-refund-1",
                f"/payments/{payment_id}/refunds",
                {"amount": str(part), "metadata": {"reason": "partial"}},
            )
            if not refund.succeeded:
                return
        # The rest (no amount: everything not yet refunded).
        await self._request("refund", f"{prefix}-refund-2", f"/payments/{payment_id}/refunds", {})

    async def _request(self, kind: str, key: str, path: str, body: dict[str, Any]) -> Operation:
        assert self._http is not None
        op = Operation(kind, key, path, {"idempotency_key": key, **body})
        self.operations.append(op)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OPERATION_DEADLINE_SECONDS
        content = json.dumps(op.body)
        for attempt in itertools.count():
            base_url = next(self._urls)
            answer = Answer(sent_at=loop.time(), received_at=0.0, base_url=base_url)
            try:
                admin = ADMIN_AUTH if path.startswith("/admin/") else {}
                response = await self._http.post(
                    base_url + path,
                    content=content,
                    headers={"Content-Type": "application/json", **admin},
                )
            except httpx.TransportError as error:
                answer.error = type(error).__name__
                pause = 0.05
            else:
                answer.status = response.status_code
                answer.retry_after = response.headers.get("Retry-After")
                document = _json_or_none(response)
                if response.status_code >= 400 and isinstance(document, dict):
                    answer.code = document.get("code")
                if _definitive(response.status_code, answer.code):
                    answer.received_at = loop.time()
                    op.answers.append(answer)
                    op.final = answer
                    op.response = document
                    return op
                pause = min(float(answer.retry_after or 0.1), 1.0)
            answer.received_at = loop.time()
            op.answers.append(answer)
            if loop.time() > deadline:
                return op  # gave up: final stays None and the test reports it
            # A real client's pause between retries, growing a little, at most a second.
            await asyncio.sleep(min(pause * (1 + attempt / 10), 1.0))
        raise AssertionError("unreachable")


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json(parse_float=Decimal)
    except ValueError:
        return None


# -- the assertions every fault test ends with ---------------------------------------------------
async def assert_clients_got_what_the_database_holds(
    load: LoadGenerator, db: FaultDatabase
) -> None:
    """Every operation ended with the expected 2xx; the database holds exactly what was answered.

    - every client request got a definitive answer, and it was the success its flow expects
      (no 500 at any time, no hang);
    - every payment and refund answered 2xx is in the database as answered;
    - there is exactly one payment per payment key and one refund per refund key: no client
      retry ever made a second one, and nothing exists that no client was told about.
    """
    unanswered = [op for op in load.operations if op.final is None]
    assert not unanswered, (
        f"{len(unanswered)} request(s) never got a definitive answer; first: "
        f"{unanswered[0].kind} {unanswered[0].path} answers "
        f"{[(a.status, a.error, a.code) for a in unanswered[0].answers[-5:]]}"
    )
    errors = [
        (op, a)
        for op, a in load.answers()
        if a.status is not None and a.status >= 500 and a.status != 503
    ]
    assert not errors, (
        f"{len(errors)} 5xx other than 503, e.g. {errors[0][1]} for {errors[0][0].path}"
    )
    hangs = [(op, a) for op, a in load.answers() if a.timed_out]
    assert not hangs, f"{len(hangs)} request(s) got no answer within {CLIENT_TIMEOUT_SECONDS} s"
    unexpected = [op for op in load.operations if not op.succeeded]
    assert not unexpected, (
        f"{len(unexpected)} operation(s) ended without success, e.g. {unexpected[0].kind} "
        f"{unexpected[0].path}: {unexpected[0].final} {unexpected[0].response}"
    )
    for _, answer in load.answers():
        if answer.status == 503:
            assert answer.retry_after, "a 503 without Retry-After"
            assert answer.code == "DATABASE_UNAVAILABLE", f"a 503 with code {answer.code}"

    payments = await _stored_as_answered(
        db, load, "create", "payments", "payment_id", "trip_id, amount, status"
    )
    for op in load.operations:
        if op.kind == "create":
            row = payments[key_hash(op.key)]
            assert row["trip_id"] == op.body["trip_id"], dict(row)
            assert row["amount"] == Decimal(op.body["amount"]), dict(row)
        elif op.kind == "settle":
            payment_id = int(op.path.split("/")[3])  # /admin/payments/{id}/settlement
            row = next(r for r in payments.values() if r["payment_id"] == payment_id)
            assert row["status"] != "PENDING", dict(row)
            assert (row["status"] == "FAILED") == (op.body["status"] == "FAILED"), dict(row)
    refunds = await _stored_as_answered(
        db, load, "refund", "payment_refunds", "refund_id", "amount"
    )
    for op in load.operations:
        if op.kind == "refund":
            assert op.response is not None
            row = refunds[key_hash(op.key)]
            assert row["amount"] == Decimal(str(op.response["refund_amount"])), dict(row)


async def _stored_as_answered(
    db: FaultDatabase, load: LoadGenerator, kind: str, table: str, id_column: str, columns: str
) -> dict[str, asyncpg.Record]:
    """The rows of `table` by key hash, asserting one row per key, one key per operation of
    `kind`, and each row's id equal to the one its client was answered."""
    rows = await db.fetch(f"SELECT idempotency_hash, {id_column}, {columns} FROM {table}")
    by_key: dict[str, asyncpg.Record] = {}
    for row in rows:
        assert row["idempotency_hash"] not in by_key, f"a key made two rows in {table}: {dict(row)}"
        by_key[row["idempotency_hash"]] = row
    operations = [op for op in load.operations if op.kind == kind]
    assert len(by_key) == len(operations), (
        f"{len(by_key)} rows in {table} for {len(operations)} keys: a row no client was told of"
    )
    for op in operations:
        assert op.response is not None
        row = by_key.get(key_hash(op.key))
        assert row is not None, f"{id_column} {op.response[id_column]} answered 2xx is not stored"
        assert row[id_column] == op.response[id_column], (dict(row), op.response)
    return by_key


async def assert_every_event_delivered(
    stack: ServiceStack, *, timeout: float, exactly_once: bool
) -> list[asyncpg.Record]:
    """Wait until every delivery is DELIVERED and each endpoint's receiver acknowledged each of
    its events; every event has a delivery to every endpoint of the stack.

    `exactly_once`: no event reached a receiver twice as a real (non-stalled) delivery — only
    crashes may cause duplicates. Every callback must carry webhook-id = Idempotency-Key = the
    body's event_id and a signature valid with its endpoint's secret; per (endpoint, payment),
    events are first acknowledged in the order they were written.
    """
    db = stack.db

    async def all_delivered() -> bool:
        if await db.fetchval("SELECT count(*) FROM deliveries WHERE status <> 'DELIVERED'"):
            return False
        rows = await db.fetch(f"SELECT endpoint, event_id::text AS event_id FROM {DELIVERY_ROWS}")
        wanted: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            wanted[row["endpoint"]].add(row["event_id"])
        return all(
            wanted[name] <= set(receiver.accepted_counts())
            for name, receiver in stack.endpoints.items()
        )

    try:
        await wait_for(
            all_delivered, timeout=timeout, what="every delivery to be delivered", interval=0.2
        )
    except AssertionError:
        stuck = await db.fetch(
            "SELECT endpoint, id, event_type, status, attempts, last_error, next_attempt_at, "
            f"locked_until FROM {DELIVERY_ROWS} WHERE status <> 'DELIVERED' ORDER BY id LIMIT 5"
        )
        states = await db.fetch(
            "SELECT name, state, consecutive_failures, breaker_open_until FROM endpoints"
        )
        raise AssertionError(
            f"undelivered deliveries, e.g. {[dict(r) for r in stuck]}; "
            f"endpoints {[dict(r) for r in states]}"
        ) from None
    names = {row["name"] for row in await db.fetch("SELECT name FROM endpoints")}
    assert names == set(stack.endpoints), names
    missing = await db.fetch(
        """
        SELECT e.id, ep.name
          FROM outbox_events AS e CROSS JOIN endpoints AS ep
         WHERE NOT EXISTS (SELECT 1 FROM deliveries AS d
                            WHERE d.event_id = e.id AND d.endpoint_id = ep.endpoint_id)
         LIMIT 5
        """
    )
    assert not missing, f"events without a delivery to an endpoint: {[dict(r) for r in missing]}"
    events = await db.fetch(
        "SELECT event_id::text AS event_id, event_type, aggregate_id, payload::text AS payload "
        "FROM outbox_events ORDER BY id"
    )
    for name, receiver in stack.endpoints.items():
        _assert_received_as_written(name, receiver, events, exactly_once=exactly_once)
    return events


def _assert_received_as_written(
    name: str, receiver: Receiver, events: list[asyncpg.Record], *, exactly_once: bool
) -> None:
    """What one endpoint's receiver got: the events as stored, signed with its secret, first
    acknowledged in order per payment, and (`exactly_once`) none acknowledged twice."""
    expected = {row["event_id"]: row for row in events}
    assert set(receiver.accepted_counts()) == set(expected), f"{name}: not every event acknowledged"
    for delivery in receiver.deliveries:
        assert delivery.event_id in expected, f"{name}: a callback for an unknown event: {delivery}"
        assert delivery.webhook_id == delivery.event_id == delivery.idempotency_key, delivery
        assert delivery.signature_ok is True, f"{name}: bad signature on {delivery.event_id}"
        assert delivery.event == json.loads(expected[delivery.event_id]["payload"]), delivery
    if exactly_once:
        twice = {event: n for event, n in receiver.accepted_counts().items() if n > 1}
        assert not twice, f"{name}: {len(twice)} event(s) delivered more than once without a crash"
    first_ack: dict[str, int] = {}
    for position, delivery in enumerate(receiver.deliveries):
        if delivery.event_id and delivery.accepted:
            first_ack.setdefault(delivery.event_id, position)
    by_payment: dict[int, list[str]] = {}
    for row in events:
        by_payment.setdefault(row["aggregate_id"], []).append(row["event_id"])
    for payment_id, written in by_payment.items():
        acknowledged = sorted(written, key=first_ack.__getitem__)
        assert acknowledged == written, f"{name}: payment {payment_id}'s events overtook each other"
