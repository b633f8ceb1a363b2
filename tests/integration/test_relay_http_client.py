"""The relay's HTTP/1.1 client against scripted servers on 127.0.0.1: keep-alive, odd answers."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from outbox_relay import http
from outbox_relay.http import BrokenAnswer, CallbackClient, ConnectFailed, TimedOut
from payment_service.callback_urls import NetworkPolicy
from payment_service.embedded import free_port

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Scripted"], Awaitable[None]]
Servers = Callable[[Script], Awaitable["Scripted"]]

LOCAL = NetworkPolicy(allow_loopback=True)  # the tests' receivers are on 127.0.0.1


class Scripted:
    """A raw TCP server whose connection handler is a test's script."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/hooks?x=1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    started: list[Scripted] = []

    async def start(script: Script) -> Scripted:
        server = await Scripted(script).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


def answering(*answers: bytes) -> Script:
    """Answer each request on a connection with the next answer (the last repeats)."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Scripted) -> None:
        for i in range(1000):
            await s.read_request(r)
            w.write(answers[min(i, len(answers) - 1)])
            await w.drain()

    return script


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def client(url: str, timeout: float = 2.0, connections: int = 4) -> CallbackClient:
    return CallbackClient(
        url, networks=LOCAL, max_connections=connections, timeout=timeout, user_agent="t/1"
    )


async def test_the_request_is_one_well_formed_post(servers: Servers) -> None:
    server = await servers(answering(OK))
    answer = await client(server.url).post(b'{"a": 1}', [("webhook-id", "w1"), ("x-b", "2")])
    assert (answer.status, answer.body) == (200, b"ok")
    port = server.url.split(":")[2].split("/")[0]
    assert server.requests == [
        b"POST /hooks?x=1 HTTP/1.1\r\nhost: 127.0.0.1:" + port.encode() + b"\r\n"
        b"user-agent: t/1\r\nwebhook-id: w1\r\nx-b: 2\r\ncontent-length: 8\r\n\r\n"
        b'{"a": 1}'
    ]


async def test_connections_are_kept_alive_and_bounded(servers: Servers) -> None:
    server = await servers(answering(OK))
    c = client(server.url, connections=3)
    for _ in range(5):
        assert (await c.post(b"{}", [])).status == 200
    assert server.connections == 1
    answers = await asyncio.gather(*(c.post(b"{}", []) for _ in range(30)))
    assert {a.status for a in answers} == {200}
    assert server.connections <= 3
    await c.aclose()


async def test_a_connection_the_server_closed_while_idle_is_replaced(servers: Servers) -> None:
    async def one_then_drop(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Scripted) -> None:
        await s.read_request(r)
        w.write(OK)
        await w.drain()
        if s.connections == 1:
            await s.read_request(r)  # the second request on the kept-alive connection: no answer
        else:
            await answering(OK)(r, w, s)

    server = await servers(one_then_drop)
    c = client(server.url)
    assert (await c.post(b"{}", [])).status == 200
    assert (await c.post(b"{}", [])).status == 200  # retried once on a fresh connection
    assert server.connections == 2


async def test_a_fresh_connection_closed_without_an_answer_is_an_error(servers: Servers) -> None:
    async def drop(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Scripted) -> None:
        await s.read_request(r)

    server = await servers(drop)
    with pytest.raises(BrokenAnswer):
        await client(server.url).post(b"{}", [])


@pytest.mark.parametrize(
    ("answer", "body", "reused"),
    [
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n"
            b"trailer: 1\r\n\r\n",
            b"abcde",
            True,
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\nx",
            b"x",
            True,
        ),
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\ny", b"y", False),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nz", b"z", False),
    ],
)
async def test_answer_framings(servers: Servers, answer: bytes, body: bytes, reused: bool) -> None:
    server = await servers(answering(answer))
    c = client(server.url)
    for _ in range(2):
        got = await c.post(b"{}", [])
        assert got.body == body
    assert server.connections == (1 if reused else 2)


async def test_a_body_without_length_runs_to_the_end_of_the_connection(servers: Servers) -> None:
    async def until_close(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Scripted) -> None:
        await s.read_request(r)
        w.write(b"HTTP/1.1 500 Oops\r\n\r\nsomething broke")
        await w.drain()

    server = await servers(until_close)
    answer = await client(server.url).post(b"{}", [])
    assert (answer.status, answer.body) == (500, b"something broke")


async def test_a_huge_answer_is_cut_and_its_connection_dropped(servers: Servers) -> None:
    size = http.MAX_BODY_BYTES * 2
    server = await servers(
        answering(b"HTTP/1.1 503 Busy\r\ncontent-length: %d\r\n\r\n" % size + b"x" * size)
    )
    c = client(server.url)
    answer = await c.post(b"{}", [])
    assert answer.status == 503 and len(answer.body) == http.MAX_BODY_BYTES
    await c.post(b"{}", [])
    assert server.connections == 2


async def test_not_http_is_an_error(servers: Servers) -> None:
    server = await servers(answering(b"SSH-2.0-OpenSSH\r\n\r\n"))
    with pytest.raises(BrokenAnswer):
        await client(server.url).post(b"{}", [])


async def test_timeout_and_refused(servers: Servers) -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Scripted) -> None:
        await s.read_request(r)
        await asyncio.sleep(5)

    server = await servers(silent)
    with pytest.raises(TimedOut):
        await client(server.url, timeout=0.2).post(b"{}", [])
    with pytest.raises(ConnectFailed):
        await client(f"http://127.0.0.1:{free_port()}/x").post(b"{}", [])


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        client("ftp://example.com/x")
    ipv6 = client("https://[::1]:8443/h")
    assert ipv6._prefix.startswith(b"POST /h HTTP/1.1\r\nhost: [::1]:8443\r\n")


async def test_https_with_the_receivers_certificate_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(OK)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await client(f"https://localhost:{port}/h").post(b"{}", [])
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the receiver's certificate
        answer = await client(f"https://localhost:{port}/h").post(b"{}", [])
        assert (answer.status, answer.body) == (200, b"ok")
        assert requests[-1].startswith(b"POST /h HTTP/1.1\r\nhost: localhost:%d\r\n" % port)
    finally:
        server.close()


def endless(head: bytes, piece: bytes) -> Script:
    """Answer `head`, then write `piece` over and over until the client hangs up."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Scripted) -> None:
        await s.read_request(r)
        w.write(head)
        while True:
            w.write(piece)
            await w.drain()

    return script


CHUNKED_200 = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "script",
    [
        answering(CHUNKED_200 + b"1" * (http.MAX_HEAD_BYTES + 10) + b"\r\n"),
        answering(CHUNKED_200 + b"-5\r\nabc\r\n0\r\n\r\n"),
        answering(CHUNKED_200 + b"zz\r\nabc\r\n0\r\n\r\n"),
        answering(CHUNKED_200 + b"0x3\r\nabc\r\n0\r\n\r\n"),
        answering(CHUNKED_200 + b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n"),
        answering(CHUNKED_200 + b"2\r\nabc\r\n0\r\n\r\n"),  # a chunk longer than its size
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\nabc"),
        answering(b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n"),
        answering(b"HTTP/1.1 \xb200 OK\r\ncontent-length: 0\r\n\r\n"),  # a superscript digit
        answering(b"HTTP/2 200 OK\r\ncontent-length: 0\r\n\r\n"),
        answering(b"\x00\x00\x00\r\n\r\n"),
        endless(CHUNKED_200, b"400\r\n" + b"x" * 0x400 + b"\r\n"),  # chunks without an end
        endless(CHUNKED_200, b"1;" + b"e" * 1000 + b"\r\nx\r\n"),  # tiny chunks, huge extensions
        endless(CHUNKED_200 + b"0\r\n", b"trailer: " + b"t" * 1000 + b"\r\n"),  # endless trailers
        endless(b"HTTP/1.1 200 OK\r\n\r\n", b"y" * 4096),  # no length, never closed
        endless(b"", b"HTTP/1.1 100 Continue\r\n\r\n"),  # interim answers for ever
    ],
    ids=[
        "chunk-size-line-over-head-limit",
        "negative-chunk-size",
        "garbage-chunk-size",
        "0x-chunk-size",
        "underscore-chunk-size",
        "chunk-longer-than-its-size",
        "negative-content-length",
        "four-digit-status",
        "non-ascii-digit-status",
        "http-2-status-line",
        "nul-bytes-status-line",
        "chunked-without-end",
        "chunk-extensions-without-end",
        "trailers-without-end",
        "no-length-without-end",
        "interim-answers-without-end",
    ],
)
async def test_a_malformed_answer_is_a_broken_answer_read_within_bounds(
    servers: Servers, script: Script
) -> None:
    server = await servers(script)
    c = client(server.url, timeout=5.0)  # a bound, not a measurement: a read for ever fails here
    with pytest.raises(BrokenAnswer):
        await c.post(b"{}", [])
    assert c._idle == []  # a connection that carried a malformed answer is never used again


async def test_a_status_outside_100_to_599_is_an_answer_whose_connection_is_dropped(
    servers: Servers,
) -> None:
    odd = [
        b"HTTP/1.1 999 Odd\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 099 x\r\ncontent-length: 0\r\n\r\n",
    ]

    async def by_connection(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Scripted) -> None:
        await answering(odd[s.connections - 1])(r, w, s)

    server = await servers(by_connection)
    c = client(server.url)
    answer = await c.post(b"{}", [])
    assert (answer.status, answer.status_line, answer.body) == (999, "HTTP/1.1 999 Odd", b"abc")
    answer = await c.post(b"{}", [])
    assert (answer.status, answer.status_line) == (99, "HTTP/1.1 099 x")
    assert server.connections == 2
