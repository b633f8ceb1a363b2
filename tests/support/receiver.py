"""The test receiver: a stand-in Notification Service on 127.0.0.1, the one every test uses.

A real HTTP/1.1 server on asyncio streams (keep-alive, Content-Length bodies) in the test's event
loop. It records every callback posted to its path in `deliveries`, in arrival order, and answers
each by its `policy`: an async function of the `Delivery` that a test swaps at will. The policy
may await anything first (a delay, an event) and returns
- a `Reply(status, body, headers)`: an ordinary answer (`answer_ok`, `answer_status(...)`);
- `None`: the connection is dropped without a word;
- `HANG`: nothing is answered until the client hangs up, `release()` is called, or
  `STALL_CAP_SECONDS` pass; then the connection closes (`hold()` does this to every request,
  `hang_first_request_of_each_event()` to each event's first);
- a `Raw(first, again)`: odd bytes: `first`, then `again` over and over until the client hangs up.

`stop_listening()` / `listen_again()` make it refuse connections for a while, on the same port.
With a `secret`, each callback's Standard Webhooks signature is checked as it arrives
(`Delivery.signature_ok`); `Delivery.verify()` checks one on demand with the tests' `SECRET`.
`owner_of` names the process behind a connection from its client port (faults' `socket_owner`).

Answers are written as the demo sink writes them (payment_cli/sink.py's `HttpResponse`, here
`Reply`, and `encode_response`); the connection handling is this module's own, because the sink
never needs to misbehave the ways the tests make this one misbehave.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from standardwebhooks import Webhook

from payment_cli.sink import HttpResponse, encode_response
from payment_service.endpoints import insert_endpoint
from tests.support.environment import CALLBACK_PATH, SECRET

if TYPE_CHECKING:
    from tests.support.database import EventRow

# How long a held request waits for the client to give up before the connection closes anyway:
# far longer than any request timeout the tests configure, so reaching it means the client did
# not enforce its timeout.
STALL_CAP_SECONDS = 30.0
MAX_HEAD_BYTES = 64 * 1024


Reply = HttpResponse  # an ordinary HTTP answer, written as the demo sink writes its own


@dataclass(frozen=True)
class Raw:
    """Bytes written as they are: `first`, then `again` repeatedly until the client hangs up."""

    first: bytes
    again: bytes = b""


class Hang:
    """No answer at all until the client hangs up (or `release()`, or the cap)."""


HANG = Hang()
OK = Reply(200, b'{"ok": true}')

Answer = Reply | Raw | Hang | None


@dataclass(eq=False)
class Delivery:
    """One callback request as received, and what became of it."""

    seq: int  # its position in `Receiver.deliveries`
    headers: dict[str, str]  # lower-case names
    body: bytes
    arrived: float  # time.monotonic()
    origin: str | None = None  # which process sent it, when the receiver knows how to tell
    signature_ok: bool | None = None  # None when the receiver has no secret
    status: int | None = None  # the status answered; None while pending, or when none was
    stalled: bool = False  # held unanswered (HANG)
    relay_hung_up: bool = False  # a held request ended because the client closed the connection
    finished: bool = False  # the request is over (answered, dropped, or its hold ended)

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("idempotency-key")

    @cached_property
    def event(self) -> dict[str, Any]:
        """The JSON body; {} when it is not a JSON object."""
        try:
            parsed = json.loads(self.body)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    @property
    def event_id(self) -> str | None:
        return self.event.get("event_id")

    @property
    def event_type(self) -> str | None:
        return self.event.get("event_type")

    @property
    def accepted(self) -> bool:
        """Answered with a 2xx."""
        return self.status is not None and 200 <= self.status < 300

    def verify(self, secret: str = SECRET) -> dict[str, Any]:
        """Check the signature with the `standardwebhooks` package; the parsed payload."""
        return Webhook(secret).verify(self.body, self.headers)


Policy = Callable[[Delivery], Awaitable[Answer]]


async def answer_ok(_delivery: Delivery) -> Answer:
    return OK


def answer_status(status: int, headers: tuple[tuple[str, str], ...] = ()) -> Policy:
    async def policy(_delivery: Delivery) -> Answer:
        return Reply(status, b'{"error": "test"}', headers)

    return policy


async def answer_hang(_delivery: Delivery) -> Answer:
    return HANG


def hang_first_request_of_each_event() -> Policy:
    """Hold each event's first request until the client gives up on it; answer the rest 200."""
    hung: set[str | None] = set()

    async def policy(delivery: Delivery) -> Answer:
        if delivery.event_id in hung:
            return OK
        hung.add(delivery.event_id)
        return HANG

    return policy


@dataclass(eq=False)
class Receiver:
    """A recording HTTP receiver on 127.0.0.1; `policy` decides each answer."""

    port: int = 0  # 0: any free port, kept from the first start on
    path: str = CALLBACK_PATH
    secret: str | None = None
    policy: Policy = answer_ok
    owner_of: Callable[[int], str | None] | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _connections: dict[asyncio.StreamWriter, asyncio.Task[Any] | None] = field(default_factory=dict)
    _idle: set[asyncio.StreamWriter] = field(default_factory=set)
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(
            self._serve_connection, "127.0.0.1", self.port, reuse_address=True, limit=MAX_HEAD_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def listen_again(self) -> None:
        """Listen again, on the same port."""
        await self.start()

    async def stop_listening(self, *, answer_in_flight: bool = False) -> None:
        """Close the port (connects are refused) and drop every open connection.

        With `answer_in_flight`, a request already being answered still gets its answer, then its
        connection closes: the receiver never acknowledges what the client did not see
        acknowledged. Only idle connections are dropped at once.
        """
        if self._server is not None:
            self._server.close()
        for writer, task in list(self._connections.items()):
            if answer_in_flight and writer not in self._idle:
                continue
            writer.transport.abort()
            if task is not None and task is not asyncio.current_task():
                task.cancel()  # a policy still working on an answer nobody will read
        if self._server is not None and not answer_in_flight:
            await self._server.wait_closed()
        self._server = None

    async def close(self) -> None:
        await self.stop_listening()
        self._released.set()

    def hold(self) -> None:
        """From now on, hold every request unanswered until `release()`."""
        self._released = asyncio.Event()
        self.policy = answer_hang

    def release(self, policy: Policy = answer_ok) -> None:
        """End the held requests (unanswered: their connections close); answer by `policy`."""
        self.policy = policy
        self._released.set()

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what arrived -------------------------------------------------------------------------
    def accepted(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.accepted]

    def accepted_ids(self) -> set[str]:
        return {d.webhook_id for d in self.accepted()}

    def accepted_counts(self) -> Counter[str]:
        """webhook-id -> how many times it was answered 2xx."""
        return Counter(d.webhook_id for d in self.accepted())

    def requests_for(self, webhook_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.webhook_id == webhook_id]

    def open_connections(self) -> int:
        """Connections still being served (a dead client's close once their requests are read)."""
        return len(self._connections)

    def held(self) -> int:
        """Requests being held right now."""
        return sum(d.stalled and not d.finished for d in self.deliveries)

    # -- HTTP ----------------------------------------------------------------------------------
    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._connections[writer] = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        origin = self.owner_of(peer[1]) if self.owner_of and peer else None
        try:
            while self.listening:
                self._idle.add(writer)
                request = await _read_request(reader)
                self._idle.discard(writer)
                if request is None or writer.transport.is_closing():
                    break  # closed by the client, or dropped by stop_listening() unread
                if not await self._serve_request(request, reader, writer, origin):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._idle.discard(writer)
            self._connections.pop(writer, None)
            writer.close()

    async def _serve_request(
        self,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        origin: str | None,
    ) -> bool:
        """Answer one request; False when the connection must close."""
        if request.path != self.path or request.method != "POST":
            await _write(writer, encode_response(Reply(404), request.keep_alive))
            return request.keep_alive
        delivery = Delivery(
            seq=len(self.deliveries),
            headers=request.headers,
            body=request.body,
            arrived=time.monotonic(),
            origin=origin,
            signature_ok=self._signature_ok(request),
        )
        self.deliveries.append(delivery)
        try:
            answer = await self.policy(delivery)
            if answer is None:
                writer.transport.abort()
                return False
            if isinstance(answer, Hang):
                await self._hang(reader, delivery)
                return False
            if isinstance(answer, Raw):
                await _write(writer, answer.first)
                while answer.again:  # until the client hangs up: the write fails then
                    await _write(writer, answer.again)
                return False
            # Recorded before the write, which a client in this event loop may see at once; taken
            # back if the write fails (the client never saw it).
            delivery.status = answer.status
            try:
                await _write(writer, encode_response(answer, request.keep_alive))
            except BaseException:
                delivery.status = None
                raise
            return request.keep_alive
        finally:
            delivery.finished = True

    async def _hang(self, reader: asyncio.StreamReader, delivery: Delivery) -> None:
        """Answer nothing until the client hangs up, `release()` is called, or the cap."""
        delivery.stalled = True
        delivery.relay_hung_up = await hold_until_hang_up(reader, self._released)

    def _signature_ok(self, request: _Request) -> bool | None:
        if not self.secret:
            return None
        try:
            Webhook(self.secret).verify(request.body, request.headers)
        except Exception:
            return False
        return True


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


async def read_head(reader: asyncio.StreamReader) -> list[str] | None:
    """The lines of the next request's head; None when the client closed the connection
    between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if error.partial.strip():
            raise
        return None
    return head[:-4].decode("latin-1").split("\r\n")


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request on a connection; None when the client closed it between requests."""
    lines = await read_head(reader)
    if lines is None:
        return None
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.partition(" ")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return _Request(method, target.split("?", 1)[0], headers, body, keep_alive)


async def hold_until_hang_up(
    reader: asyncio.StreamReader, released: asyncio.Event, cap: float = STALL_CAP_SECONDS
) -> bool:
    """Wait until the client hangs up, `released` is set, or `cap` seconds pass; whether the
    client hung up (a clean close or a reset; not more bytes)."""
    hang_up = asyncio.ensure_future(reader.read(1))
    release = asyncio.ensure_future(released.wait())
    try:
        done, _ = await asyncio.wait(
            {hang_up, release}, timeout=cap, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in (hang_up, release):
            task.cancel()
        await asyncio.gather(hang_up, release, return_exceptions=True)
    # b"" is a clean close; an exception a reset.
    return hang_up in done and (hang_up.exception() is not None or hang_up.result() == b"")


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


def assert_ordered_per_payment(receiver: Receiver, events: list[EventRow]) -> None:
    """No request for a payment's event arrived before the previous event was accepted."""
    by_id = {e.event_id: e for e in events}
    first_request: dict[str, int] = {}
    accepted_at: dict[str, int] = {}
    for d in receiver.deliveries:
        first_request.setdefault(d.webhook_id, d.seq)
        if d.accepted:
            accepted_at.setdefault(d.webhook_id, d.seq)
    chains: dict[int, list[EventRow]] = {}
    for event in sorted(events, key=lambda e: e.id):
        chains.setdefault(event.payment_id, []).append(event)
    for payment_id, chain in chains.items():
        for earlier, later in itertools.pairwise(chain):
            assert earlier.event_id in accepted_at, f"payment {payment_id}: {earlier} not accepted"
            assert first_request[later.event_id] > accepted_at[earlier.event_id], (
                f"payment {payment_id}: event seq {later.seq} was sent before seq {earlier.seq} "
                "was accepted"
            )
    assert set(by_id) <= set(first_request)


@contextlib.asynccontextmanager
async def subscribed(
    conn: asyncpg.Connection, name: str, *, policy: Policy = answer_ok, secret: str | None = None
) -> AsyncIterator[Receiver]:
    """A receiver on 127.0.0.1 at path `/name`, subscribed as endpoint `name` (every event type;
    signed with `secret`, or a secret of its own); closed at the end."""
    receiver = await Receiver(path=f"/{name}", policy=policy).start()
    await insert_endpoint(conn, name=name, url=receiver.base_url + receiver.path, secret=secret)
    try:
        yield receiver
    finally:
        await receiver.close()


@pytest.fixture(name="receiver")
async def receiver_fixture() -> AsyncIterator[Receiver]:
    """A recording receiver on 127.0.0.1 that answers 200 until told otherwise."""
    receiver = await Receiver().start()
    try:
        yield receiver
    finally:
        await receiver.close()
