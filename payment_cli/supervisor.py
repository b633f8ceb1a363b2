"""`payment-service run`: the one-command local service.

Starts an embedded PostgreSQL when no database is configured (data kept under
PAYMENT_SERVICE_DATA_DIR, on a port it keeps across restarts; the DATABASE_URL that reaches it is
printed, as a line to paste into another terminal), applies migrations, starts the embedded gateway
when GATEWAY=stripe and no STRIPE_SECRET_KEY is configured (its address, a test key and a webhook
secret of this run are given to the children), then runs the API and the relay as child
processes, restarting one that dies (the gateway too). SIGINT/SIGTERM stop the children, then the
database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

from payment_service import MULTIPROCESS_DIRECTORY_VARIABLE, endpoints
from payment_service.config import Settings
from payment_service.database import wait_for_database
from payment_service.embedded import EmbeddedPostgres, port_free
from payment_service.gateway.embedded import EmbeddedGateway, EmbeddedGatewayError
from payment_service.migrations import migrate
from payment_service.process import die_with_parent

logger = logging.getLogger(__name__)

EMBEDDED_DATABASE = "payments"
# The embedded server's port on its first start (unless taken); it keeps its port from then on, so
# the DATABASE_URL that `run` prints stays right across restarts.
EMBEDDED_PORT = 54320
STOP_GRACE_SECONDS = 20
RESTART_DELAY_SECONDS = 2.0
MAX_RESTARTS_PER_MINUTE = 5
POLL_SECONDS = 0.2  # how often children are checked; a signal handler runs at once regardless


def say(message: str) -> None:
    """Progress for the person at the terminal (logs stay JSON on stdout)."""
    print(f"payment-service: {message}", file=sys.stderr, flush=True)


@dataclass
class Child:
    name: str
    argv: list[str]
    unset: tuple[str, ...] = ()  # variables of `run`'s environment this child must not get
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, env: dict[str, str]) -> None:
        # The API and the relay stop (gracefully) if `run` itself is killed without a chance to
        # stop them.
        supervisor = os.getpid()
        own = {name: value for name, value in env.items() if name not in self.unset}
        self.process = subprocess.Popen(
            self.argv, env=own, preexec_fn=lambda: die_with_parent(supervisor)
        )

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()


@dataclass
class GatewayChild:
    """The embedded gateway among the children: restarted on the same port (its webhook
    registered again) when it dies. Its objects do not survive that: it keeps them in memory."""

    gateway: EmbeddedGateway
    name: str = "gateway"
    restarts: list[float] = field(default_factory=list)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.gateway.process

    def start(self, env: dict[str, str]) -> None:
        try:
            self.gateway.restart()
        except EmbeddedGatewayError as error:
            say(f"{error}")  # still exited: the supervisor tries again, then gives up

    def exited(self) -> int | None:
        return self.gateway.exited()


# Where the embedded gateway posts its events: the API's webhook route.
WEBHOOK_PATH = "/gateway/stripe/webhook"


def start_embedded_gateway(
    settings: Settings, env: dict[str, str], host: str, port: int
) -> EmbeddedGateway | None:
    """With GATEWAY=stripe and no STRIPE_SECRET_KEY: start the embedded gateway, register the
    API's webhook with a secret of this run, and point the children's settings at it."""
    if settings.gateway != "stripe" or settings.stripe_secret_key is not None:
        return None
    data_dir = settings.payment_service_data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    gateway = EmbeddedGateway(log_path=data_dir / "gateway.log")
    webhook_secret = "whsec_" + secrets.token_urlsafe(32)
    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104
    gateway.register_webhook(
        f"http://{target}:{port}{settings.api_prefix}{WEBHOOK_PATH}", webhook_secret
    )
    say("starting the embedded gateway (localstripe; it forgets everything when it stops)")
    gateway.start()
    env.update(
        STRIPE_API_BASE=gateway.base_url,
        STRIPE_SECRET_KEY=gateway.api_key,
        STRIPE_WEBHOOK_SECRET=webhook_secret,
        STRIPE_API_FLAVOUR="localstripe",
    )
    say(f"embedded gateway on {gateway.base_url} (log: {data_dir / 'gateway.log'})")
    # Its key is the embedded gateway's fixed fake one (any sk_ key works there), not a secret;
    # the webhook secret of this run is never printed.
    say("to use it from another terminal (payment-service reconcile, gateway review):")
    print(
        f"    export GATEWAY=stripe STRIPE_API_BASE={gateway.base_url} "
        f"STRIPE_SECRET_KEY={gateway.api_key} STRIPE_API_FLAVOUR=localstripe",
        file=sys.stderr,
        flush=True,
    )
    return gateway


@dataclass
class Prepared:
    """What `prepare_database` did: migrations applied, endpoints seeded (and what seeding found
    different on endpoints that an operator changed)."""

    applied: list[int]
    seeding: list[endpoints.SeedNote]

    def describe(self) -> list[str]:
        """What was done, a line each."""
        lines = [
            f"applied migration(s): {', '.join(f'{v:04d}' for v in self.applied)}"
            if self.applied
            else "database is up to date"
        ]
        return lines + [note.text for note in self.seeding if not note.warning]

    def warnings(self) -> list[str]:
        """Where the settings and an endpoint an operator changed disagree, a line each."""
        return [f"warning: {note.text}" for note in self.seeding if note.warning]


def prepare_database(dsn: str, settings: Settings, *, wait: float = 60) -> Prepared:
    """Apply pending migrations, then seed endpoints from the settings (those not changed by an
    operator follow them): what `migrate` and `run` do before anything else."""

    async def go() -> Prepared:
        conn = await wait_for_database(dsn, timeout=wait)
        try:
            applied = await migrate(conn)
            return Prepared(applied, await endpoints.seed_from_settings(conn, settings))
        finally:
            await conn.close()

    return asyncio.run(go())


def run_all(settings: Settings, *, with_relay: bool = True, host: str = "127.0.0.1") -> int:
    port = settings.service_port
    if not port_free(host, port):
        say(f"port {port} on {host} is in use; stop what uses it or set SERVICE_PORT")
        return 1

    embedded: EmbeddedPostgres | None = None
    env = dict(os.environ)
    if settings.has_database:
        dsn = settings.dsn()
        say("using the configured database")
    else:
        data_dir = settings.payment_service_data_dir.resolve()
        embedded = EmbeddedPostgres(data_dir / "postgres", preferred_port=EMBEDDED_PORT)
        say(f"starting the embedded PostgreSQL (data in {data_dir / 'postgres'})")
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            embedded.start()
        except OSError as error:
            # Not a database outage: the data directory cannot be made or written.
            say(
                f"cannot keep the embedded database's data in {data_dir} "
                f"(PAYMENT_SERVICE_DATA_DIR): {error.strerror or error}"
            )
            return 1
        embedded.ensure_database(EMBEDDED_DATABASE)
        dsn = embedded.dsn(EMBEDDED_DATABASE)
        env["DATABASE_URL"] = dsn
        say(f"embedded PostgreSQL is up on 127.0.0.1:{embedded.port} (the same at every start)")
        say("to use it from another terminal (payment-service endpoints, outbox, check, psql):")
        print(f"    export DATABASE_URL={dsn}", file=sys.stderr, flush=True)

    gateway: EmbeddedGateway | None = None
    try:
        prepared = prepare_database(dsn, settings)
        for line in prepared.describe() + prepared.warnings():
            say(line)
        gateway = start_embedded_gateway(settings, env, host, port)

        command = [sys.executable, "-m", "payment_cli.cli"]
        children = [Child("api", [*command, "serve", "--host", host, "--port", str(port)])]
        if with_relay:
            # The API's metrics directory is its workers' alone: the relay serves its own
            # metrics, and in that directory its values would add up into the API's /metrics.
            children.append(
                Child("relay", [*command, "relay"], unset=(MULTIPROCESS_DIRECTORY_VARIABLE,))
            )
        return _supervise(children, env, host, port, settings, gateway)
    finally:
        if gateway is not None:
            say("stopping the embedded gateway")
            gateway.stop()
        if embedded is not None:
            say("stopping the embedded PostgreSQL")
            embedded.stop()


def _supervise(
    children: list[Child],
    env: dict[str, str],
    host: str,
    port: int,
    settings: Settings,
    gateway: EmbeddedGateway | None,
) -> int:
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def wait_unless_stopping(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, POLL_SECONDS))

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for starting in children:
            starting.start(env)
        # Watched and restarted like the others; stopped after them (they may be mid-call).
        watched: list[Child | GatewayChild] = [*children]
        if gateway is not None:
            watched.append(GatewayChild(gateway))
        say(f"API on http://{host}:{port}  (try: curl http://{host}:{port}/health)")
        if len(children) > 1:
            say("relay delivering callbacks to the endpoints (payment-service endpoints list)")
        say("press Ctrl-C to stop")
        while not stopping:
            for child in watched:
                code = child.exited()
                if code is None or stopping:
                    continue
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                if len(child.restarts) > MAX_RESTARTS_PER_MINUTE:
                    say(f"{child.name} keeps exiting (last code {code}); giving up")
                    stopping = True
                    break
                say(f"{child.name} exited with code {code}; restarting")
                # Ctrl-C during the delay means stop: nothing is started again after it.
                wait_unless_stopping(RESTART_DELAY_SECONDS)
                if stopping:
                    break
                child.start(env)
            wait_unless_stopping(POLL_SECONDS)
        return _stop_children(children)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_children(children: list[Child]) -> int:
    say("stopping")
    for child in children:
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    clean = True
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{child.name} did not stop within {STOP_GRACE_SECONDS} s; killing it")
            child.process.kill()
            child.process.wait()
            clean = False
    return 0 if clean else 1
