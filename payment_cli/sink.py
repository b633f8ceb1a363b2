"""`payment-service notification-sink`: a stand-in Notification Service for demos and tests.

It receives the relay's callbacks on NOTIFICATION_CALLBACK_PATH, verifies their Standard Webhooks
signature with `--secret` (an added endpoint's own secret) or else CALLBACK_SIGNING_SECRET when
either is set (401 when it does not match), dedupes on `webhook-id`, and prints one JSON line per
callback. `--fail-first`, `--fail-rate`, `--status` and `--delay` make it answer
errors or slowly, to watch the relay retry.

The HTTP/1.1 server underneath (`HttpServer`) is deliberately tiny: keep-alive, Content-Length
bodies, one handler coroutine per request. The tests have their own receiver
(tests/support/receiver.py), which misbehaves in ways a demo sink need not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TextIO

from payment_service.config import Settings
from payment_service.endpoints import EndpointError, check_secret
from payment_service.entry import printable
from payment_service.signing import secret_key, verify

logger = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024
REMEMBERED_IDS = 100_000  # webhook-ids kept for deduplication (oldest forgotten first)


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"


# A handler answers a request; None means "drop the connection without answering".
Handler = Callable[[HttpRequest], Awaitable[HttpResponse | None]]


class HttpServer:
    """A minimal HTTP/1.1 server on asyncio streams."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.StreamWriter, asyncio.Task[None] | None] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, limit=MAX_HEAD_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every open connection (a receiver that went away)."""
        if self._server is not None:
            self._server.close()
        for writer, task in list(self._connections.items()):
            writer.transport.abort()
            if task is not None and task is not asyncio.current_task():
                task.cancel()  # a handler still working on an answer nobody will read
        self._connections.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._connections[writer] = asyncio.current_task()
        try:
            while True:
                request, keep_alive = await _read_request(reader)
                if request is None:
                    return
                response = await self.handler(request)
                if response is None:
                    writer.transport.abort()
                    return
                writer.write(encode_response(response, keep_alive))
                await writer.drain()
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        except _BadRequest as error:
            writer.write(encode_response(HttpResponse(error.status), keep_alive=False))
        finally:
            self._connections.pop(writer, None)
            writer.close()


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def _read_request(reader: asyncio.StreamReader) -> tuple[HttpRequest | None, bool]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial.strip():
            raise _BadRequest(400) from None
        return None, False  # the client closed an idle connection
    lines = head[:-4].decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise _BadRequest(400) from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(400)
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _BadRequest(501)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise _BadRequest(400) from None
    if length < 0 or length > MAX_BODY_BYTES:
        raise _BadRequest(413)
    body = await reader.readexactly(length) if length else b""
    connection = headers.get("connection", "").lower()
    keep_alive = version == "HTTP/1.1" and connection != "close"
    return HttpRequest(method, target.split("?", 1)[0], headers, body), keep_alive


def encode_response(response: HttpResponse, keep_alive: bool) -> bytes:
    """The bytes of an answer (the tests' receiver writes its answers with it too)."""
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {response.status} {reason}", f"content-length: {len(response.body)}"]
    if response.body:
        lines.append(f"content-type: {response.content_type}")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body


# -- the sink -------------------------------------------------------------------------------------
@dataclass
class SinkOptions:
    name: str = "notification"  # printed with each event: which stand-in service got it
    path: str = "/notifications"
    signing_key: bytes | None = None
    fail_first: int = 0  # answer the first N callbacks with `status`
    fail_rate: float = 0.0  # answer this fraction of callbacks with `status`
    status: int | None = None  # alone: answer every callback with it
    delay: float = 0.0  # seconds to wait before answering
    out: TextIO = field(default_factory=lambda: sys.stdout)


class Sink:
    """Verifies, dedupes and prints callbacks; answers errors when told to."""

    def __init__(self, options: SinkOptions) -> None:
        self.options = options
        self.received = 0
        self._seen: OrderedDict[str, None] = OrderedDict()

    def _should_fail(self) -> bool:
        o = self.options
        if o.fail_first or o.fail_rate:
            return self.received <= o.fail_first or random.random() < o.fail_rate
        return o.status is not None

    async def handle(self, request: HttpRequest) -> HttpResponse:
        o = self.options
        if request.method == "GET" and request.path == "/health":
            return HttpResponse(200, b'{"status": "ok"}')
        if request.path != o.path:
            return HttpResponse(404, b'{"error": "not found"}')
        if request.method != "POST":
            return HttpResponse(405, b'{"error": "method not allowed"}', (("allow", "POST"),))
        self.received += 1
        if o.delay:
            await asyncio.sleep(o.delay)
        webhook_id = request.headers.get("webhook-id", "")
        signature = self._check_signature(request, webhook_id)
        if signature == "invalid":
            self._print(webhook_id, signature, 401, False, None)
            return HttpResponse(401, b'{"error": "invalid or missing signature"}')
        try:
            json.loads(request.body)
        except ValueError:
            self._print(webhook_id, signature, 400, False, None)
            return HttpResponse(400, b'{"error": "body is not JSON"}')
        if self._should_fail():
            status = o.status or 500
            self._print(webhook_id, signature, status, False, request.body)
            return HttpResponse(status, b'{"error": "failing on purpose (notification-sink)"}')
        duplicate = webhook_id in self._seen
        if not duplicate and webhook_id:
            self._seen[webhook_id] = None
            if len(self._seen) > REMEMBERED_IDS:
                self._seen.popitem(last=False)
        self._print(webhook_id, signature, 200, duplicate, request.body)
        return HttpResponse(200, b'{"received": true}')

    def _check_signature(self, request: HttpRequest, webhook_id: str) -> str:
        key = self.options.signing_key
        if key is None:
            return "not checked"
        ok = verify(
            key,
            msg_id=webhook_id,
            timestamp=request.headers.get("webhook-timestamp", ""),
            body=request.body,
            signature_header=request.headers.get("webhook-signature", ""),
            now=time.time(),
        )
        return "valid" if ok else "invalid"

    def _print(
        self, webhook_id: str, signature: str, answered: int, duplicate: bool, body: bytes | None
    ) -> None:
        line = json.dumps(
            {
                "received_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "sink": self.options.name,
                "webhook_id": webhook_id,
                "signature": signature,
                "answered": answered,
                "duplicate": duplicate,
            }
        )
        if body is not None:
            # The event exactly as sent (no float round trip for amounts); a JSON body's raw
            # newlines and tabs can only be whitespace, so the line stays one line, and any other
            # control character is escaped (`printable`): a body cannot drive the terminal.
            event = printable(
                body.decode("utf-8", "replace")
                .replace("\r", " ")
                .replace("\n", " ")
                .replace("\t", " ")
            )
            line = line[:-1] + f', "event": {event}}}'
        self.options.out.write(line + "\n")
        self.options.out.flush()


def callback_path(settings: Settings, name: str) -> str:
    """The path a stand-in for service `name` listens on: that service's *_CALLBACK_PATH when it
    is one of the guide's (trip, driver, rider) and set, else NOTIFICATION_CALLBACK_PATH."""
    path: str | None = getattr(settings, f"{name}_callback_path", None)
    return path or settings.notification_callback_path


def run_sink(settings: Settings, args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; the exit code."""
    status = args.status
    if status is not None and not 200 <= status <= 599:
        print("payment-service: --status must be an HTTP status code (200-599)", file=sys.stderr)
        return 2
    secret = args.secret or settings.callback_signing_secret
    try:
        signing_key = secret_key(check_secret(secret)) if secret else None
    except EndpointError as error:
        print(f"payment-service: --secret: {error}", file=sys.stderr)
        return 2
    options = SinkOptions(
        name=args.name,
        path=args.path or callback_path(settings, args.name),
        signing_key=signing_key,
        fail_first=max(args.fail_first, 0),
        fail_rate=min(max(args.fail_rate, 0.0), 1.0),
        status=status,
        delay=max(args.delay, 0.0),
    )

    async def serve() -> int:
        server = HttpServer(Sink(options).handle, args.host, args.port)
        try:
            await server.start()
        except OSError as error:
            print(
                f"payment-service: cannot listen on {args.host}:{args.port}: {error}",
                file=sys.stderr,
            )
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        logger.info(
            "notification sink listening",
            extra={
                "sink": options.name,
                "url": f"http://{args.host}:{server.port}{options.path}",
                "verifying_signatures": options.signing_key is not None,
            },
        )
        await stop.wait()
        await server.close()
        return 0

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed where it exists
        return asyncio.run(serve())
    return uvloop.run(serve())
