"""The notification sink: its tiny HTTP server on 127.0.0.1, and how it answers and prints."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from payment_cli.sink import HttpRequest, HttpResponse, HttpServer, Sink, SinkOptions
from payment_service.signing import secret_key, sign
from tests.support.environment import SECRET

BODY = b'{"event_id": "e-1", "amount": 150.10, "status": "SUCCESS"}'


@pytest.fixture
async def echo_server() -> AsyncIterator[HttpServer]:
    async def echo(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, request.method.encode() + b" " + request.body)

    server = HttpServer(echo)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def exchange(server: HttpServer, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.read(), timeout=5)  # until the server closes
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"POST /x HTTP/1.1\r\nbad header line\r\n\r\n", b"400"),
        (b"POST /x HTTP/1.1\r\ncontent-length: nope\r\n\r\n", b"400"),
        (b"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", b"501"),
        (b"POST /x HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n", b"413"),
    ],
)
async def test_malformed_requests_get_an_error_and_the_connection_closes(
    echo_server: HttpServer, raw: bytes, status: bytes
) -> None:
    answer = await exchange(echo_server, raw)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert b"connection: close" in answer


async def test_keep_alive_for_http_1_1_and_close_for_http_1_0(echo_server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_server.port)
    try:
        for n in range(3):
            writer.write(b"POST /a HTTP/1.1\r\ncontent-length: 1\r\n\r\n%d" % n)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n")
            assert await reader.readexactly(6) == b"POST %d" % n
    finally:
        writer.close()
    answer = await exchange(echo_server, b"GET /b HTTP/1.0\r\n\r\n")
    assert answer.endswith(b"connection: close\r\n\r\nGET ")


def sink(**options: object) -> tuple[Sink, io.StringIO]:
    out = io.StringIO()
    return Sink(SinkOptions(out=out, **options)), out  # type: ignore[arg-type]


def callback(event_id: str = "e-1", key: bytes | None = None, body: bytes = BODY) -> HttpRequest:
    now = int(time.time())
    headers = {"webhook-id": event_id, "webhook-timestamp": str(now)}
    if key is not None:
        headers["webhook-signature"] = sign(key, event_id, now, body)
    return HttpRequest("POST", "/notifications", headers, body)


def printed(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line, parse_float=Decimal) for line in out.getvalue().splitlines()]


async def test_the_sink_verifies_dedupes_and_prints_the_event_exactly() -> None:
    key = secret_key(SECRET)
    s, out = sink(signing_key=key)
    assert (await s.handle(callback(key=key))).status == 200
    assert (await s.handle(callback(key=key))).status == 200
    assert (await s.handle(callback(key=b"x" * 32))).status == 401
    assert (await s.handle(callback(key=None))).status == 401
    lines = printed(out)
    assert [(x["answered"], x["duplicate"], x["signature"]) for x in lines] == [
        (200, False, "valid"),
        (200, True, "valid"),
        (401, False, "invalid"),
        (401, False, "invalid"),
    ]
    assert lines[0]["event"] == {
        "event_id": "e-1",
        "amount": Decimal("150.10"),  # printed as sent, never through a float
        "status": "SUCCESS",
    }


async def test_the_sink_routes() -> None:
    s, _out = sink()
    assert (await s.handle(HttpRequest("GET", "/health", {}, b""))).status == 200
    assert (await s.handle(HttpRequest("POST", "/other", {}, b"{}"))).status == 404
    assert (await s.handle(HttpRequest("GET", "/notifications", {}, b""))).status == 405
    bad = HttpRequest("POST", "/notifications", {"webhook-id": "x"}, b"not json")
    assert (await s.handle(bad)).status == 400


async def test_failure_options() -> None:
    first, _ = sink(fail_first=2)
    answers = [(await first.handle(callback(f"e{i}"))).status for i in range(4)]
    assert answers == [500, 500, 200, 200]
    gone, _ = sink(status=410)
    assert {(await gone.handle(callback(f"e{i}"))).status for i in range(3)} == {410}
    always, _ = sink(fail_rate=1.0, status=503)
    assert (await always.handle(callback())).status == 503
    never, _ = sink(fail_rate=0.0)
    assert (await never.handle(callback())).status == 200
    slow, _ = sink(delay=0.2)
    started = time.monotonic()
    await slow.handle(callback())
    assert time.monotonic() - started >= 0.2
