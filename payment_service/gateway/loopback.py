"""Run a Python program, by module name, with its listening sockets held to loopback.

    python -P loopback.py MODULE [ARGS...]

For a program that binds every interface and offers no option to choose (the embedded gateway
binds `::`). Run as the program's interpreter, this rewrites a bind to a wildcard address ("",
0.0.0.0, ::) into IPv4 loopback, refuses a bind to any address that is not loopback, then runs
MODULE as `python -m MODULE ARGS` would. It is a standalone script (hence `-P`: its folder is not
put on sys.path) that imports only the standard library: nothing of the service's, nothing of the
program's, which runs as itself in its own process.
"""

from __future__ import annotations

import errno
import ipaddress
import runpy
import socket
import sys
from typing import Any

_WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # noqa: S104 - the addresses being rewritten
_LOOPBACK_NAMES = frozenset({"localhost"})
_original_bind = socket.socket.bind


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _loopback_bind(sock: socket.socket, address: Any) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
        host = address[0]
        if host in _WILDCARDS:
            if sock.family == socket.AF_INET6:
                # IPv4 loopback through an IPv6 socket: dual-stack on, whatever the system's
                # default, so clients reach it at 127.0.0.1.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                address = ("::ffff:127.0.0.1", *address[1:])
            else:
                address = ("127.0.0.1", *address[1:])
        elif not is_loopback(host):
            raise PermissionError(errno.EACCES, f"only loopback addresses may be bound, not {host}")
    _original_bind(sock, address)


def main() -> None:
    if len(sys.argv) < 2:
        print("usage: python -P loopback.py MODULE [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    socket.socket.bind = _loopback_bind  # type: ignore[method-assign, assignment]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
