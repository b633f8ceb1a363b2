"""The floor for POST /payments: the API's own statement from a bare ASGI function.

No framework, no validation model, no hooks: parse the JSON body, hash the key, fingerprint the
request, send app/payments.py insert_payment's SQL (read from the source) with asyncpg on a pool
without asyncpg's reset query, answer the stored body. Not a service — a measurement of what the
HTTP server, the driver and PostgreSQL cost without the layers above them. `make bench` runs it
under Uvicorn (the "floor" row); set BARE_POOL_RESET=1 to keep asyncpg's default reset.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import service_insert_sql  # loadtests/bench.py

SQL = service_insert_sql()
_state: dict[str, Any] = {}
JSON_HEADERS = [(b"content-type", b"application/json")]


async def _keep_session(_conn: asyncpg.Connection) -> None:
    return None


async def _jsonb_as_text(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=lambda text: text, schema="pg_catalog"
    )


async def _lifespan(receive: Any, send: Any) -> None:
    await receive()
    _state["pool"] = await asyncpg.create_pool(
        os.environ["DATABASE_URL"],
        min_size=2,
        max_size=10,
        init=_jsonb_as_text,
        reset=None if os.environ.get("BARE_POOL_RESET") else _keep_session,
    )
    await send({"type": "lifespan.startup.complete"})
    await receive()
    await _state["pool"].close()
    await send({"type": "lifespan.shutdown.complete"})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    answer = b"{}"
    if scope["method"] == "POST":
        data = json.loads(body)
        digest = hashlib.sha256(data.pop("idempotency_key").encode()).digest()
        fingerprint = hashlib.sha256(
            json.dumps(data, sort_keys=True, default=str).encode()
        ).hexdigest()
        async with _state["pool"].acquire() as conn:
            row = await conn.fetchrow(
                SQL,
                int.from_bytes(digest[:8], "big", signed=True),
                digest.hex(),
                data["trip_id"],
                Decimal(str(data["amount"])),
                data.get("currency", "INR"),
                data["method"],
                "SUCCESS",
                secrets.token_hex(4),
                data.get("metadata") or {},
                "payment.succeeded",
                {},
                "POST:/payments",
                fingerprint,
                200,
                86400,
            )
        answer = row["body"].encode()
    await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": answer})
