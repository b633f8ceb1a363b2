"""The loopback launcher: a wildcard bind becomes loopback, any other address is refused."""

from __future__ import annotations

import socket

import pytest

from payment_service.gateway import loopback


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("fd00::2", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert loopback.is_loopback(host) is expected


@pytest.mark.parametrize(
    ("family", "wildcard"),
    [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET, ""), (socket.AF_INET6, "::")],
)
def test_a_wildcard_bind_becomes_loopback(family: socket.AddressFamily, wildcard: str) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        loopback._loopback_bind(sock, (wildcard, 0))
        bound = sock.getsockname()[0]
    assert bound in ("127.0.0.1", "::ffff:127.0.0.1")


def test_a_bind_elsewhere_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(PermissionError):
            loopback._loopback_bind(sock, ("192.0.2.2", 0))
        loopback._loopback_bind(sock, ("127.0.0.1", 0))  # loopback itself stays allowed
