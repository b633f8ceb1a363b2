"""A fault-injecting HTTP proxy on 127.0.0.1, in the test's event loop.

Put it in front of the embedded gateway (the adapter's API base is the proxy) to lose answers
after the gateway acted, answer 5xx, or hang past the client's time-out; or in front of our
webhook URL (the gateway's webhook points at the proxy) to repeat a webhook, delay one, or
deliver two out of order. Everything passes through unchanged unless a rule matches; the first
rule that matches a request and has uses left decides what happens to it:

- `FORWARD`: pass it through;
- `DROP_AFTER_FORWARD`: forward it, and once the upstream has answered (it acted), close the
  client's connection without a word;
- `answer(status)`: answer without forwarding (the upstream never sees it);
- `forward_then_answer(status)`: forward it, throw the upstream's answer away, answer `status`;
- `HANG`: forward it, then hold the answer until the client hangs up (its time-out),
  `release()`, or the receiver's stall cap; `HANG_BEFORE_FORWARD` holds it without forwarding;
- `repeat(n)`: forward it n times, answer with the first answer;
- `delay(seconds)`: forward it after `seconds` (or at `release()`);
- `REORDER`: hold it until the next request that matches the same rule has been forwarded, then
  forward it (two matching requests arrive in the opposite order).

Each request is recorded as an `Exchange` (what was done, how many times it was forwarded, the
upstream's status, the status answered). One connection serves one request (the proxy answers
`Connection: close`), so a dropped connection never takes another request with it. Bodies are
Content-Length framed, which is what the SDK and the gateway's webhook client send.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.receiver import STALL_CAP_SECONDS, hold_until_hang_up, read_head

MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Action:
    kind: str
    status: int = 500
    times: int = 1
    seconds: float = 0.0


FORWARD = Action("forward")
DROP_AFTER_FORWARD = Action("drop_after_forward")
HANG = Action("hang")
HANG_BEFORE_FORWARD = Action("hang_before_forward")
REORDER = Action("reorder")


def answer(status: int = 500) -> Action:
    return Action("answer", status=status)


def forward_then_answer(status: int = 500) -> Action:
    return Action("forward_then_answer", status=status)


def repeat(times: int = 2) -> Action:
    return Action("repeat", times=times)


def delay(seconds: float) -> Action:
    return Action("delay", seconds=seconds)


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query, as sent
    head_lines: tuple[str, ...]  # the header lines as sent, without the request line
    body: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        for line in self.head_lines:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


Matcher = Callable[[Request], bool]


def matching(
    method: str | None = None, path: str | None = None, body: bytes | str | None = None
) -> Matcher:
    """Requests with this method, a path matching this regular expression (in full), and a body
    containing these bytes; an argument left out matches anything."""
    pattern = re.compile(path) if path is not None else None
    needle = body.encode() if isinstance(body, str) else body

    def match(request: Request) -> bool:
        return (
            (method is None or request.method == method)
            and (pattern is None or pattern.fullmatch(request.path) is not None)
            and (needle is None or needle in request.body)
        )

    return match


@dataclass(eq=False)
class Rule:
    match: Matcher
    action: Action
    times: int | None = 1  # None: every matching request
    hits: int = 0
    _held: list[asyncio.Event] = field(default_factory=list)

    @property
    def spent(self) -> bool:
        return self.times is not None and self.hits >= self.times


@dataclass(eq=False)
class Exchange:
    """One request through the proxy and what became of it."""

    request: Request
    action: str
    forwarded: int = 0
    upstream_status: int | None = None
    answered: int | None = None  # the status sent to the client; None: dropped or held
    client_hung_up: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class FaultProxy:
    """Forwards to `upstream` (a base URL on loopback), faults as its rules say."""

    upstream: str
    rules: list[Rule] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_HEAD_BYTES)
        return self

    async def close(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on(self, match: Matcher, action: Action, *, times: int | None = 1) -> Rule:
        """From now on, do `action` to the next `times` requests that `match` (None: all)."""
        rule = Rule(match, action, times)
        self.rules.append(rule)
        return rule

    def release(self) -> None:
        """End every hold and delay now (held requests are forwarded or answered as their
        action says); later holds wait again."""
        self._released.set()
        self._released = asyncio.Event()

    def matching_exchanges(self, match: Matcher) -> list[Exchange]:
        return [e for e in self.exchanges if match(e.request)]

    # -- serving ----------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        exchange: Exchange | None = None
        try:
            request = await _read_request(reader)
            if request is None:
                return
            rule = next((r for r in self.rules if not r.spent and r.match(request)), None)
            action = FORWARD
            if rule is not None:
                rule.hits += 1
                action = rule.action
            exchange = Exchange(request, action.kind)
            self.exchanges.append(exchange)
            await self._act(action, rule, exchange, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if exchange is not None:
                exchange.finished.set()
            writer.close()
            self._tasks.discard(task)

    async def _act(
        self,
        action: Action,
        rule: Rule | None,
        exchange: Exchange,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        request = exchange.request
        match action.kind:
            case "forward":
                await self._reply(writer, exchange, await self._forward(exchange))
            case "drop_after_forward":
                await self._forward(exchange)
                writer.transport.abort()
            case "answer":
                await self._reply(writer, exchange, _simple_answer(action.status))
            case "forward_then_answer":
                await self._forward(exchange)
                await self._reply(writer, exchange, _simple_answer(action.status))
            case "hang":
                await self._forward(exchange)
                await self._hold(reader, exchange)
            case "hang_before_forward":
                await self._hold(reader, exchange)
            case "repeat":
                first = await self._forward(exchange)
                for _ in range(action.times - 1):
                    await self._forward(exchange)
                await self._reply(writer, exchange, first)
            case "delay":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), action.seconds)
                await self._reply(writer, exchange, await self._forward(exchange))
            case "reorder":
                assert rule is not None
                if rule.hits % 2 == 1:  # the first of a pair waits for the second
                    turn = asyncio.Event()
                    rule._held.append(turn)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(turn.wait(), STALL_CAP_SECONDS)
                    await self._reply(writer, exchange, await self._forward(exchange))
                else:
                    await self._reply(writer, exchange, await self._forward(exchange))
                    while rule._held:
                        rule._held.pop(0).set()
            case _:
                raise AssertionError(f"unknown action {action.kind} for {request.target}")

    async def _forward(self, exchange: Exchange) -> bytes:
        """Send the request upstream; its whole answer (the upstream closes after it)."""
        request = exchange.request
        address = urlsplit(self.upstream)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            address.hostname, address.port
        )
        try:
            lines = [f"{request.method} {request.target} HTTP/1.1"]
            lines += [line for line in request.head_lines if not _is_connection_header(line)]
            lines.append("Connection: close")
            upstream_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            upstream_writer.write(request.body)
            await upstream_writer.drain()
            raw = await upstream_reader.read()
        finally:
            upstream_writer.close()
            with contextlib.suppress(OSError):
                await upstream_writer.wait_closed()
        exchange.forwarded += 1
        if exchange.upstream_status is None:
            exchange.upstream_status = _status_of(raw)
        return raw

    async def _reply(self, writer: asyncio.StreamWriter, exchange: Exchange, raw: bytes) -> None:
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = [
            line
            for line in head.decode("latin-1").split("\r\n")
            if line and not _is_connection_header(line)
        ]
        lines.append("Connection: close")
        exchange.answered = _status_of(raw)
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _hold(self, reader: asyncio.StreamReader, exchange: Exchange) -> None:
        """Answer nothing until the client hangs up, `release()`, or the cap."""
        exchange.client_hung_up = await hold_until_hang_up(
            reader, self._released, STALL_CAP_SECONDS
        )


def _is_connection_header(line: str) -> bool:
    return line.split(":", 1)[0].strip().lower() in {"connection", "keep-alive"}


def _status_of(raw: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return int(match[1]) if match else None


def _simple_answer(status: int) -> bytes:
    body = b'{"error": {"message": "injected by the fault proxy", "type": "api_error"}}'
    return (
        f"HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    lines = await read_head(reader)
    if lines is None:
        return None
    request_line, *head_lines = lines
    method, target, _version = request_line.split(" ", 2)
    request = Request(method, target, tuple(head_lines), b"")
    length = int(request.header("content-length") or 0)
    body = await reader.readexactly(length) if length else b""
    return Request(method, target, tuple(head_lines), body)


@contextlib.asynccontextmanager
async def fault_proxy(upstream: str) -> AsyncIterator[FaultProxy]:
    """A started proxy in front of `upstream`, closed at the end."""
    proxy = await FaultProxy(upstream).start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture(name="proxy_factory")
async def proxy_factory_fixture() -> AsyncIterator[Callable[[str], Any]]:
    """Start proxies in front of upstream URLs; all are closed at the end of the test."""
    started: list[FaultProxy] = []

    async def start(upstream: str) -> FaultProxy:
        proxy = await FaultProxy(upstream).start()
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.close()
