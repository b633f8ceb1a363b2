"""The embedded gateway: `localstripe`, a stateful Stripe fake, as a supervised child process.

`payment-service run` starts it when no STRIPE_SECRET_KEY is configured, and the tests run one
per session. It is GPL-3 software and runs as a program of its own: nothing in this service
imports it (`make lint` checks); it comes with the `embedded` extra, like the embedded
PostgreSQL.

What it is like, and what this module does about it:
- It binds every interface (`::`) and has no option to choose. It is started through the
  `loopback` launcher (loopback.py beside this file), which holds its listening socket to
  127.0.0.1.
- It accepts any `sk_…` key; the one given to the service is `EMBEDDED_API_KEY`, obviously fake.
- Its webhooks are registered over HTTP and kept in memory only: `register_webhook` remembers
  them and a restart registers them again.
- It keeps its objects in memory and also writes them all to one fixed file
  (/tmp/localstripe.pickle) after every change, which it reads back at start unless told
  `--from-scratch`. That file is shared by every instance on the machine, so this module always
  starts it from scratch: the embedded gateway forgets everything when it stops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from payment_service.config import ConfigurationError
from payment_service.embedded import free_port
from payment_service.process import die_with_parent

logger = logging.getLogger(__name__)

PROGRAM = "localstripe"
LAUNCHER = Path(__file__).with_name("loopback.py")
# Any key that starts with sk_ is accepted by the embedded gateway; this one names what it is.
EMBEDDED_API_KEY = "sk_test_embedded"
HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 10
START_ATTEMPTS = 3  # a free port may be taken between choosing it and binding it
REQUEST_TIMEOUT_SECONDS = 5
POLL_SECONDS = 0.05
WEBHOOK_ID = "payment-service"


class EmbeddedGatewayUnavailable(ConfigurationError):
    """The `localstripe` package (the `embedded` extra) is not installed."""


class EmbeddedGatewayError(OSError):
    """The embedded gateway did not start, or did not answer (a process or a port's trouble,
    reported in one line like any other OSError of a command)."""


def installed() -> bool:
    """Whether the program is installed (found, not imported)."""
    return importlib.util.find_spec(PROGRAM) is not None


class EmbeddedGateway:
    """One `localstripe` process on 127.0.0.1: `start()`, `register_webhook()`, `stop()`."""

    def __init__(self, *, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port
        self._fixed_port = port is not None
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._webhooks: dict[str, tuple[str, str]] = {}  # id -> (url, secret)

    def __repr__(self) -> str:  # the webhook secrets stay out
        return f"EmbeddedGateway(port={self.port}, running={self.running()})"

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise EmbeddedGatewayError("the embedded gateway has not been started")
        return f"http://{HOST}:{self.port}"

    @property
    def api_key(self) -> str:
        return EMBEDDED_API_KEY

    def command(self, port: int) -> list[str]:
        """The child's command line: the program through the loopback launcher."""
        return [sys.executable, "-P", str(LAUNCHER), PROGRAM, "--port", str(port), "--from-scratch"]

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the process and wait until it answers; register the remembered webhooks."""
        if not installed():
            raise EmbeddedGatewayUnavailable(
                "the embedded gateway is not installed: install the 'embedded' extra "
                "(pip install 'payment-service[embedded]'; `make install` does) or set "
                "STRIPE_SECRET_KEY"
            )
        if self.running():
            return
        for attempt in range(1, START_ATTEMPTS + 1):
            port = self.port if self._fixed_port and self.port else free_port()
            self._spawn(port)
            try:
                self._wait_ready(timeout)
                break
            except EmbeddedGatewayError:
                self.stop()
                if self._fixed_port or attempt == START_ATTEMPTS:
                    raise
                logger.warning("embedded gateway did not start; trying another port")
        for webhook_id, (url, secret) in self._webhooks.items():
            self._register(webhook_id, url, secret)
        logger.info("embedded gateway is up", extra={"port": self.port})

    def _spawn(self, port: int) -> None:
        self.port = port
        parent = os.getpid()
        # A plain environment: the service's settings and secrets are none of its business.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        with contextlib.ExitStack() as stack:
            output = (
                stack.enter_context(self.log_path.open("ab"))
                if self.log_path is not None
                else subprocess.DEVNULL
            )
            self.process = subprocess.Popen(
                self.command(port),
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                # It stops when its parent dies, as `run`'s other children do.
                preexec_fn=lambda: die_with_parent(parent),
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise EmbeddedGatewayError(f"the embedded gateway exited (code {code})")
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise EmbeddedGatewayError(
                    f"the embedded gateway did not answer within {timeout} s"
                )
            time.sleep(POLL_SECONDS)

    def _answers(self) -> bool:
        # A list of events: authenticated, and changes nothing.
        auth = {"Authorization": f"Bearer {EMBEDDED_API_KEY}"}
        return self._request("GET", "/v1/events?limit=1", headers=auth) == 200

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exited(self) -> int | None:
        """Its exit code if it was started and has exited, else None."""
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """SIGTERM, then SIGKILL at the deadline; the exit code (None if it was not started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("embedded gateway did not stop on SIGTERM; killing it")
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL, as a crash would: everything it held is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Start it again on the same port (its state is gone) and register the webhooks again."""
        self.stop()
        self._fixed_port = True
        self.start()

    # -- configuration over HTTP ------------------------------------------------------------------
    def register_webhook(self, url: str, secret: str, webhook_id: str = WEBHOOK_ID) -> None:
        """Have every event POSTed to `url`, signed with `secret`; kept across restarts."""
        self._webhooks[webhook_id] = (url, secret)
        if self.running():
            self._register(webhook_id, url, secret)

    def _register(self, webhook_id: str, url: str, secret: str) -> None:
        body = urllib.parse.urlencode({"url": url, "secret": secret}).encode()
        self._post(f"/_config/webhooks/{urllib.parse.quote(webhook_id, safe='')}", body)

    def clear(self) -> None:
        """Forget every object (the registered webhooks stay)."""
        self._post("/_config/data", None, method="DELETE")

    def _post(self, path: str, body: bytes | None, method: str = "POST") -> None:
        status = self._request(method, path, body)
        if status != 200:
            answer = f"answered {status}" if status else "did not answer"
            raise EmbeddedGatewayError(f"the embedded gateway {answer} {method} {path}")

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> int:
        """One request to the gateway on loopback: its status, 0 when it did not answer."""
        url = f"{self.base_url}{path}"  # always http://127.0.0.1:port
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as answer:  # noqa: S310
                return int(answer.status)
        except urllib.error.HTTPError as error:
            return int(error.code)
        except OSError:
            return 0
