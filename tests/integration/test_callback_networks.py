"""Where callbacks may go, checked by the relay's HTTP client when it connects: on the address a
name resolves to at that moment, so a name that was harmless when the endpoint was added and
resolves to a refused address later (DNS rebinding) is caught. Real servers on 127.0.0.1 and ::1;
the refusals are proved with loopback addresses under the production policy."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from outbox_relay.http import AddressRefused, CallbackClient
from payment_service.callback_urls import NetworkPolicy, network_policy, parse_networks

PRODUCTION = network_policy(production=True)
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Listener:
    """A server on one loopback address that answers 200 and counts its connections."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> Listener:
        self._server = await asyncio.start_server(self._serve, self.host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    server = await Listener("127.0.0.1").start()
    try:
        yield server
    finally:
        await server.close()


def client(url: str, networks: NetworkPolicy) -> CallbackClient:
    return CallbackClient(url, networks=networks, max_connections=2, timeout=5, user_agent="t/1")


async def test_production_refuses_a_loopback_address_without_connecting(
    listener: Listener,
) -> None:
    refused = client(f"http://127.0.0.1:{listener.port}/cb", PRODUCTION)
    with pytest.raises(AddressRefused) as error:
        await refused.post(b"{}", [])
    assert str(error.value) == (
        "127.0.0.1 is a loopback address, where callbacks may not go: list its network in "
        "ENDPOINT_ALLOWED_NETWORKS to allow it"
    )
    assert listener.connections == 0


async def test_the_address_a_name_resolves_to_is_what_is_checked(listener: Listener) -> None:
    with pytest.raises(AddressRefused, match=r"^localhost \(127\.0\.0\.1\) is a loopback"):
        await client(f"http://localhost:{listener.port}/cb", PRODUCTION).post(b"{}", [])
    assert listener.connections == 0


async def test_a_name_that_comes_to_resolve_to_loopback_is_refused_then(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name passed when the endpoint was added (a name is not resolved then); each new
    connection resolves it again, and the address it has now is refused."""
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo
    answers = {"callbacks.example": "127.0.0.1"}

    async def rebinding(host: Any, port: Any, **kwargs: Any) -> Any:
        return await resolve(answers.get(host, host), port, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", rebinding)
    allowed = network_policy(production=True, allowed=parse_networks(("127.0.0.0/8",)))
    trusted = client(f"http://callbacks.example:{listener.port}/cb", allowed)
    assert (await trusted.post(b"{}", [])).status == 200
    with pytest.raises(AddressRefused, match=r"^callbacks\.example \(127\.0\.0\.1\) is a loop"):
        await client(f"http://callbacks.example:{listener.port}/cb", PRODUCTION).post(b"{}", [])
    assert listener.connections == 1


async def test_only_the_allowed_addresses_of_a_name_are_connected_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name with a refused and an allowed address: only the allowed one is tried."""
    v4 = await Listener("127.0.0.1").start()
    v6 = await Listener("::1").start()
    try:
        port = v4.port
        await v6.close()
        v6 = await Listener("::1").start(port)  # the same port on both
    except OSError:
        await v4.close()
        pytest.skip("no port free on both 127.0.0.1 and ::1")
    loop = asyncio.get_running_loop()

    async def both(host: Any, port: Any, **kwargs: Any) -> Any:
        assert host == "both.example"
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", both)
    try:
        only_v4 = network_policy(production=True, allowed=parse_networks(("127.0.0.1/32",)))
        assert (await client(f"http://both.example:{port}/", only_v4).post(b"{}", [])).status == 200
        assert (v6.connections, v4.connections) == (0, 1)
        only_v6 = network_policy(production=True, allowed=parse_networks(("::1",)))
        assert (await client(f"http://both.example:{port}/", only_v6).post(b"{}", [])).status == 200
        assert (v6.connections, v4.connections) == (1, 1)
    finally:
        await v4.close()
        await v6.close()


@pytest.mark.parametrize(
    "networks",
    [
        network_policy(production=False),
        network_policy(production=True, allowed=parse_networks(("127.0.0.0/8",))),
    ],
    ids=["development", "production-listed"],
)
async def test_loopback_is_reached_in_development_or_when_listed(
    listener: Listener, networks: NetworkPolicy
) -> None:
    answer = await client(f"http://127.0.0.1:{listener.port}/cb", networks).post(b"{}", [])
    assert answer.status == 200
    assert listener.connections == 1
