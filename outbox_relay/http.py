"""A lean HTTP/1.1 client for callbacks: one URL, keep-alive connections, one write per request.

Why not httpx or aiohttp: their CPU per request was most of the relay's budget at the target rate
(docs/benchmarks.md, section "Relay", has the measurements). This client does only what
the relay needs: POST a body to one URL (http or https) and read the status, headers and a
bounded body, treating every malformed answer as a failed attempt.

Its requests are built from `parse_callback_url`, the reading of a URL that the command line and
the admin API check endpoints with. It connects only to addresses its `NetworkPolicy` allows,
checked on what the host resolves to at each new connection: a name that has come to resolve to
a refused address (DNS rebinding) fails that attempt with `AddressRefused`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from payment_service.callback_urls import (
    Address,
    NetworkPolicy,
    parse_callback_url,
    refusal_message,
)

MAX_HEAD_BYTES = 64 * 1024  # of an answer's head, and of a chunked body's size lines and trailers
# Of an answer's body kept. A longer body with a content-length is cut (its status stands) and its
# connection closed; a chunked or unframed body that has not ended by then is a BrokenAnswer.
MAX_BODY_BYTES = 64 * 1024
MAX_INTERIM_ANSWERS = 8  # 1xx answers (100 Continue, 103 Early Hints) before the real one
_HEAD_END = b"\r\n\r\n"
# "HTTP/1.x NNN[ reason]": exactly three ASCII digits ("HTTP/1.1 2000" is not a 200).
_STATUS_LINE = re.compile(r"HTTP/1\.[0-9] ([0-9]{3})(?: |\Z)")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")  # 8 hex digits are far beyond MAX_BODY_BYTES

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class CallbackError(Exception):
    """The request failed before a complete answer arrived."""


class ConnectFailed(CallbackError):
    """No connection to the receiver could be opened."""


class AddressRefused(ConnectFailed):
    """The host is, or resolves only to, addresses callbacks may not reach (NetworkPolicy)."""


class TimedOut(CallbackError):
    """No complete answer within the request timeout."""


class BrokenAnswer(CallbackError):
    """The connection closed early or the answer was not valid HTTP/1.x."""


class _Stale(Exception):
    """A kept-alive connection was closed by the server before it answered."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # three digits, as sent: it may be outside 100-599
    headers: dict[str, str]  # lower-case names
    body: bytes
    status_line: str = ""  # as sent (latin-1), for an error message


class CallbackClient:
    """POSTs to one URL over a small pool of kept-alive connections."""

    def __init__(
        self,
        url: str,
        *,
        networks: NetworkPolicy,
        max_connections: int,
        timeout: float,
        user_agent: str,
    ) -> None:
        """Raises CallbackURLError (a ValueError) for a URL no request can be made to."""
        self.url = parse_callback_url(url)
        self._host = self.url.host
        self._port = self.url.port
        self._networks = networks
        self._prefix = (
            f"POST {self.url.target} HTTP/1.1\r\nhost: {self.url.host_header}\r\n"
            f"user-agent: {user_agent}\r\n"
        ).encode("latin-1")
        self._ssl = ssl.create_default_context() if self.url.tls else None
        self._timeout = timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[Connection] = []

    async def post(self, body: bytes, headers: Sequence[tuple[str, str]]) -> Answer:
        """Send one request and read its answer; raises a CallbackError subclass on failure."""
        request = b"".join(
            (
                self._prefix,
                "".join(f"{name}: {value}\r\n" for name, value in headers).encode("latin-1"),
                b"content-length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout):
                    return await self._exchange(request)
            except TimeoutError:
                raise TimedOut(f"no answer within {self._timeout:g} s") from None

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop()[1].transport.abort()

    async def _exchange(self, request: bytes) -> Answer:
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._send(conn, request)
            except _Stale:
                pass  # the server closed it while idle: once more, on a new connection
        try:
            return await self._send(await self._connect(), request)
        except _Stale:
            raise BrokenAnswer("the connection closed before an answer") from None

    def _take_idle(self) -> Connection | None:
        while self._idle:
            reader, writer = self._idle.pop()
            if reader.at_eof() or writer.transport.is_closing():
                writer.transport.abort()
                continue
            return reader, writer
        return None

    async def _connect(self) -> Connection:
        """A new connection to the first allowed address of the host that accepts one."""
        failure: OSError | None = None
        for address in await self._addresses():
            try:
                return await asyncio.open_connection(
                    str(address),
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                    limit=MAX_HEAD_BYTES,
                )
            except OSError as error:  # refused, unreachable, TLS (ssl.SSLError is an OSError)
                failure = error
        assert failure is not None
        raise ConnectFailed(str(failure) or type(failure).__name__)

    async def _addresses(self) -> list[Address]:
        """The host's addresses (resolved now) that callbacks may reach, in the resolver's order;
        AddressRefused when there is none."""
        addresses = [self.url.address] if self.url.address is not None else []
        if not addresses:
            try:
                found = await asyncio.get_running_loop().getaddrinfo(
                    self._host, self._port, type=socket.SOCK_STREAM
                )
            except OSError as error:  # DNS: no such name, no answer
                raise ConnectFailed(str(error) or type(error).__name__) from None
            for *_, sockaddr in found:
                address = ipaddress.ip_address(sockaddr[0])
                if address not in addresses:
                    addresses.append(address)
        refused = []
        allowed = []
        for address in addresses:
            kind = self._networks.refusal(address)
            if kind is None:
                allowed.append(address)
            else:
                refused.append((address, kind))
        if not allowed:
            if not refused:
                raise ConnectFailed(f"{self._host} resolves to no address")
            raise AddressRefused(refusal_message(self._host, *refused[0]))
        return allowed

    async def _send(self, conn: Connection, request: bytes) -> Answer:
        reader, writer = conn
        keep = False
        try:
            writer.write(request)
            status_line, status, headers = await _read_head(reader)
            interim = 0
            while 100 <= status < 200:  # interim answers (100 Continue, 103 Early Hints)
                interim += 1
                if interim > MAX_INTERIM_ANSWERS:
                    raise BrokenAnswer(f"more than {MAX_INTERIM_ANSWERS} interim answers")
                status_line, status, headers = await _read_head(reader, interim=True)
            body, complete = await _read_body(reader, status, headers)
            connection = headers.get("connection", "").lower()
            keep = (
                complete
                and connection != "close"
                and status_line.startswith("HTTP/1.1 ")
                and status < 600
            )
            return Answer(status, headers, body, status_line)
        except (ConnectionError, OSError) as error:
            raise BrokenAnswer(f"{type(error).__name__}: {error}") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as error:
            # Whatever else a malformed answer trips over is that answer's fault, not the relay's.
            raise BrokenAnswer(f"malformed answer ({type(error).__name__})") from None
        finally:
            if keep:
                self._idle.append(conn)
            else:
                writer.transport.abort()


async def _read_head(
    reader: asyncio.StreamReader, *, interim: bool = False
) -> tuple[str, int, dict[str, str]]:
    """The status line, status code and headers of an answer."""
    try:
        head = await reader.readuntil(_HEAD_END)
    except asyncio.IncompleteReadError as error:
        if not error.partial and not interim:
            raise _Stale from None
        raise BrokenAnswer("the connection closed in the middle of an answer") from None
    except ConnectionResetError:
        if interim:
            raise
        raise _Stale from None
    except asyncio.LimitOverrunError:
        raise BrokenAnswer("the answer's head is too large") from None
    lines = head[: -len(_HEAD_END)].decode("latin-1").split("\r\n")
    status = _STATUS_LINE.match(lines[0])
    if status is None:
        raise BrokenAnswer(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], int(status[1]), headers


async def _read_body(
    reader: asyncio.StreamReader, status: int, headers: dict[str, str]
) -> tuple[bytes, bool]:
    """The body (at most MAX_BODY_BYTES) and whether the connection may be used again.

    Never reads more than MAX_BODY_BYTES of body and MAX_HEAD_BYTES of framing; the request
    timeout bounds the time.
    """
    try:
        if status in (204, 304):
            return b"", True
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _read_chunked(reader)
        if "content-length" in headers:
            length = headers["content-length"]
            if not (length.isascii() and length.isdigit()):
                raise BrokenAnswer(f"invalid content-length: {length[:40]!r}")
            if int(length) > MAX_BODY_BYTES:
                return await reader.readexactly(MAX_BODY_BYTES), False
            return await reader.readexactly(int(length)), True
        return await _read_to_end(reader), False
    except asyncio.IncompleteReadError:
        raise BrokenAnswer("the connection closed in the middle of an answer") from None
    except asyncio.LimitOverrunError:
        raise BrokenAnswer("a line of the answer's body is too long") from None


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    """A body without a length: it runs to the end of the connection."""
    parts: list[bytes] = []
    kept = 0
    while part := await reader.read(MAX_BODY_BYTES + 1 - kept):
        parts.append(part)
        kept += len(part)
        if kept > MAX_BODY_BYTES:
            raise BrokenAnswer(f"the answer's body did not end within {MAX_BODY_BYTES} bytes")
    return b"".join(parts)


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    parts: list[bytes] = []
    kept = 0
    framing = 0  # bytes of size lines and trailers
    while True:
        size_line = await reader.readuntil(b"\r\n")
        framing += len(size_line)
        size_field = size_line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_field):
            raise BrokenAnswer(f"invalid chunk size: {size_field[:20]!r}")
        size = int(size_field, 16)
        if size == 0:
            while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                framing += len(trailer)
                if framing > MAX_HEAD_BYTES:
                    raise BrokenAnswer("the answer's trailers are too long")
            return b"".join(parts), True
        if kept + size > MAX_BODY_BYTES or framing > MAX_HEAD_BYTES:
            raise BrokenAnswer(f"the answer's body did not end within {MAX_BODY_BYTES} bytes")
        chunk = await reader.readexactly(size + 2)
        if chunk[-2:] != b"\r\n":
            raise BrokenAnswer("a chunk is longer than its size")
        parts.append(chunk[:-2])
        kept += size
