"""A stand-in Notification Service for the fault tests: a real HTTP/1.1 server on 127.0.0.1.

It records every callback it is sent and can be switched, while the relay runs, between answering
200 at once (`ok`), answering 500 (`error`), stalling the first request of each event until the
relay hangs up (`slow`), holding every request unanswered until `release()` (`hold()`: deliveries
provably in flight, for killing the relay mid-batch), and not listening at all (`stop()`, then
`start()` on the same port).
Each delivery is verified against the Standard Webhooks signature when a secret is given.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from standardwebhooks.webhooks import Webhook

# How long a stalled request waits for the relay to give up before answering anyway: far longer
# than the RELAY_REQUEST_TIMEOUT the tests configure, so reaching it means the relay did not
# enforce its timeout.
STALL_CAP_SECONDS = 30.0


@dataclass
class Delivery:
    """One callback request as received."""

    event_id: str | None  # from the body
    webhook_id: str | None
    idempotency_key: str | None
    event_type: str | None
    body: dict[str, object]
    signature_ok: bool | None  # None when no secret is configured
    answered: int  # the status written back; 0 when none was
    stalled: bool = False  # held unanswered until the relay hung up (or release / the cap)
    relay_hung_up: bool = False  # a stalled request ended because the relay closed the connection
    finished: bool = False  # the request is over (answered, or its stall ended)
    origin: str | None = None  # which process sent it, when the receiver was told how to know


@dataclass
class CallbackReceiver:
    port: int
    secret: str | None = None
    mode: str = "ok"  # ok | error | slow | hold
    deliveries: list[Delivery] = field(default_factory=list)
    _server: asyncio.base_events.Server | None = None
    _idle: set[asyncio.StreamWriter] = field(default_factory=set)
    _open: set[asyncio.StreamWriter] = field(default_factory=set)
    _stalled_events: set[str | None] = field(default_factory=set)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    # Names the process behind a connection from its client port (see harness.socket_owner).
    owner_of: Callable[[int], str | None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, "127.0.0.1", self.port, reuse_address=True
        )

    async def stop(self) -> None:
        """Disappear: stop listening and drop idle connections.

        A request already being answered still gets its answer (then its connection closes), so
        the receiver never acknowledges an event that the relay did not see acknowledged.
        """
        if self._server is not None:
            self._server.close()
            self._server = None
            for writer in list(self._idle):
                writer.transport.abort()

    def hold(self) -> None:
        """From now on, hold every request unanswered until `release()`."""
        self._released = asyncio.Event()
        self.mode = "hold"

    def release(self, mode: str = "ok") -> None:
        """End the held requests (unanswered: connections close) and switch to `mode`."""
        self.mode = mode
        self._released.set()

    def open_connections(self) -> int:
        """Connections still being served (a dead client's close once their requests are read)."""
        return len(self._open)

    def held(self) -> int:
        """Requests being held right now."""
        return sum(d.stalled and not d.finished for d in self.deliveries)

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what the tests read ------------------------------------------------------------------
    def acknowledged(self) -> Counter[str]:
        """event_id -> how many times it was answered 2xx without stalling (a real delivery)."""
        return Counter(
            d.event_id
            for d in self.deliveries
            if d.event_id and 200 <= d.answered < 300 and not d.stalled
        )

    def received_ids(self) -> set[str]:
        return {d.event_id for d in self.deliveries if d.event_id}

    # -- HTTP ----------------------------------------------------------------------------------
    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._open.add(writer)
        peer = writer.get_extra_info("peername")
        origin = self.owner_of(peer[1]) if self.owner_of and peer else None
        try:
            while self.listening:
                self._idle.add(writer)
                head = await reader.readuntil(b"\r\n\r\n")
                self._idle.discard(writer)
                if writer.transport.is_closing():
                    break  # dropped by stop() with this request unread: the relay saw no answer
                if not await self._serve_request(head, reader, writer, origin):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._idle.discard(writer)
            self._open.discard(writer)
            writer.close()

    async def _serve_request(
        self,
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        origin: str | None,
    ) -> bool:
        """Answer one request; False when the connection must close."""
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        delivery = self._record(raw, headers)
        delivery.origin = origin
        try:
            if self.mode == "hold" or (
                self.mode == "slow" and delivery.event_id not in self._stalled_events
            ):
                # slow: hold the first request of each event until the relay gives up on it.
                self._stalled_events.add(delivery.event_id)
                await self._stall(reader, delivery)
                return False
            return await self._answer(delivery, headers, writer)
        finally:
            delivery.finished = True

    async def _stall(self, reader: asyncio.StreamReader, delivery: Delivery) -> None:
        """Answer nothing until the relay hangs up, `release()` is called, or the cap."""
        delivery.stalled = True
        hang_up = asyncio.ensure_future(reader.read(1))
        released = asyncio.ensure_future(self._released.wait())
        done, pending = await asyncio.wait(
            {hang_up, released}, timeout=STALL_CAP_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if hang_up in done and hang_up.exception() is None:
            delivery.relay_hung_up = hang_up.result() == b""
        elif hang_up in done:
            delivery.relay_hung_up = True  # the connection was reset

    async def _answer(
        self, delivery: Delivery, headers: dict[str, str], writer: asyncio.StreamWriter
    ) -> bool:
        status = 500 if self.mode == "error" else 200
        reason = b"OK" if status == 200 else b"Internal Server Error"
        body = b'{"received":true}' if status == 200 else b'{"error":"receiver failing"}'
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        await writer.drain()
        delivery.answered = status
        return headers.get("connection", "").lower() != "close"

    def _record(self, raw: bytes, headers: dict[str, str]) -> Delivery:
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        signature_ok: bool | None = None
        if self.secret:
            try:
                Webhook(self.secret).verify(raw, headers)
                signature_ok = True
            except Exception:
                signature_ok = False
        delivery = Delivery(
            event_id=body.get("event_id") if isinstance(body, dict) else None,
            webhook_id=headers.get("webhook-id"),
            idempotency_key=headers.get("idempotency-key"),
            event_type=body.get("event_type") if isinstance(body, dict) else None,
            body=body if isinstance(body, dict) else {},
            signature_ok=signature_ok,
            answered=0,
        )
        self.deliveries.append(delivery)
        return delivery
