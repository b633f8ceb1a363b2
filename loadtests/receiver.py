"""A fast callback receiver for relay benchmarks: answers every POST at once, with 200.

A bare asyncio protocol (on uvloop where installed) that parses HTTP/1.1 just enough — request
line, `Content-Length`, the `webhook-id`/`Idempotency-Key` header — and keeps connections alive,
so one core of it takes far more callbacks per second than the relay can send. It records the
arrival time of every callback; the body is kept raw and parsed only when asked for.

    python loadtests/receiver.py --port 8099 --dump arrivals.jsonl [--fail-rate 0.5]

With `--fail-rate`, that share of the callbacks, drawn at random, is answered 500 instead (an
endpoint in trouble for half its callbacks, the bench's mixed row); only 200s are recorded.

Control endpoints (GET): `/__stats` (JSON counts), `/__reset` (forget everything so far).
On SIGTERM/SIGINT it writes `--dump` (one JSON object per callback: arrival, event_id, payment_id,
event_type, occurred_at, webhook_id) and exits 0.

It is not the tests' receiver (tests/support/receiver.py), on purpose: that one runs a coroutine
per connection on asyncio streams, awaits a policy per request and keeps a record of every
callback, about twice the CPU per callback of parsing bytes in `data_received` (measured on the
2-core machine, both on uvloop: ~33 against ~15 µs). `make bench` measures the relay's
throughput on the same cores, so its receiver must stay a small share of them (the report's
"receiver" column).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from pathlib import Path

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_FAILED = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
_MAX_HEAD_BYTES = 64 * 1024


class Store:
    def __init__(self, fail_rate: float = 0.0) -> None:
        self.fail_rate = fail_rate
        self.reset()

    def reset(self) -> None:
        self.arrivals: list[float] = []
        self.ids: list[bytes] = []
        self.bodies: list[bytes] = []
        self.failed = 0  # answered 500 (--fail-rate)

    def stats(self) -> dict[str, object]:
        return {
            "count": len(self.arrivals),
            "failed": self.failed,
            "unique": len(set(self.ids)),
            "first": self.arrivals[0] if self.arrivals else None,
            "last": self.arrivals[-1] if self.arrivals else None,
        }

    def dump(self, path: Path) -> None:
        with path.open("w", encoding="utf-8") as out:
            for arrival, webhook_id, body in zip(self.arrivals, self.ids, self.bodies, strict=True):
                try:
                    event = json.loads(body)
                except ValueError:
                    event = {}
                record = {
                    "arrival": arrival,
                    "webhook_id": webhook_id.decode("latin-1"),
                    "event_id": event.get("event_id"),
                    "payment_id": event.get("payment_id"),
                    "event_type": event.get("event_type"),
                    "occurred_at": event.get("occurred_at"),
                }
                out.write(json.dumps(record) + "\n")


def _header(head: bytes, name: bytes) -> bytes:
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return b""
    start += len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


class Receiver(asyncio.Protocol):
    def __init__(self, store: Store) -> None:
        self.store = store
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        transport = self.transport
        assert transport is not None
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self.buffer) > _MAX_HEAD_BYTES:
                    transport.close()
                return
            head = bytes(self.buffer[:head_end]).lower()
            length_text = _header(head, b"content-length")
            length = int(length_text) if length_text.isdigit() else 0
            total = head_end + 4 + length
            if len(self.buffer) < total:
                return
            now = time.time()
            body = bytes(self.buffer[head_end + 4 : total])
            del self.buffer[:total]
            if head.startswith(b"post "):
                store = self.store
                if store.fail_rate and random.random() < store.fail_rate:
                    store.failed += 1
                    transport.write(_FAILED)
                    continue
                store.arrivals.append(now)
                store.ids.append(_header(head, b"webhook-id") or _header(head, b"idempotency-key"))
                store.bodies.append(body)
                transport.write(_OK)
            elif head.startswith(b"get /__stats"):
                self._json(self.store.stats())
            elif head.startswith(b"get /__reset"):
                self.store.reset()
                self._json({"reset": True})
            else:
                transport.write(_OK)

    def _json(self, payload: dict[str, object]) -> None:
        body = json.dumps(payload).encode()
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )


async def serve(host: str, port: int, dump: Path | None, fail_rate: float) -> None:
    loop = asyncio.get_running_loop()
    store = Store(fail_rate)
    server = await loop.create_server(lambda: Receiver(store), host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"receiver listening on http://{host}:{port}", flush=True)
    await stop.wait()
    server.close()
    if dump is not None:
        store.dump(dump)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dump", type=Path, help="write every callback here on exit (JSON lines)")
    parser.add_argument(
        "--fail-rate", type=float, default=0.0, help="share of callbacks answered 500 (0 to 1)"
    )
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.dump, args.fail_rate))
    else:
        uvloop.run(serve(args.host, args.port, args.dump, args.fail_rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
