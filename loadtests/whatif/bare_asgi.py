"""The floor for POST /payments: the API's own statement from a bare ASGI function.

No framework, no validation model, no hooks: parse the JSON body, hash the key, fingerprint the
request, send app/payments.py insert_payment's statement (as loadtests.bench.pgbench's
captured_insert records it) with asyncpg on a pool without asyncpg's reset query, answer the stored
body. Amount, currency and method are the benchmark's (150.00 INR by CARD, as wrk sends). Not a
service — a measurement of what the HTTP server, the driver and PostgreSQL cost without the layers
above them. `make bench` runs it under Uvicorn (the "floor" row); BARE_POOL_RESET=1 keeps asyncpg's
reset.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from typing import Any

import asyncpg

from loadtests.bench import pgbench as bench

# The API's statement and its arguments for one payment; the per-payment ones are swapped below.
SQL, TEMPLATE = bench.captured_insert()
AT = {
    value: TEMPLATE.index(value) for value in (*bench.PGBENCH_PER_PAYMENT, bench.SENT_FINGERPRINT)
}
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
        args = list(TEMPLATE)
        args[AT[bench.SENT_KEY_HASH]] = digest.hex()
        args[AT[bench.SENT_LOCK_ID]] = int.from_bytes(digest[:8], "big", signed=True)
        args[AT[bench.SENT_TRIP]] = data["trip_id"]
        args[AT[bench.SENT_SUFFIX]] = secrets.token_hex(4)
        args[AT[bench.SENT_FINGERPRINT]] = fingerprint
        async with _state["pool"].acquire() as conn:
            row = await conn.fetchrow(SQL, *args)
        answer = row["body"].encode()
    await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": answer})
