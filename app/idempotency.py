"""Idempotency keys: hashing, request fingerprints, claiming a key, storing and replaying answers.

A key's row is written in the same transaction as the operation it guards, together with the
final answer, so a row never exists without its answer and a 5xx (rolled back) stores nothing.
While an operation runs, its transaction holds `pg_try_advisory_xact_lock(lock_id(key))`; a
concurrent request with the same key fails to take it and is answered 409 at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.errors import APIError

RETRY_AFTER_SECONDS = "1"


@dataclass(frozen=True)
class IdempotencyKey:
    """A client's key and what we derive from it."""

    key_hash: str  # hex SHA-256 of the key as sent: the seed's encode(digest(key,'sha256'),'hex')
    lock_id: int  # the first 8 bytes of that digest, as a signed int64 advisory-lock key

    @classmethod
    def from_key(cls, key: str) -> IdempotencyKey:
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        return cls(digest.hex(), int.from_bytes(digest[:8], "big", signed=True))


@dataclass(frozen=True)
class Guard:
    """What an operation needs to know about its idempotency key."""

    key: IdempotencyKey
    path: str  # "POST:/payments/{payment_id}/refunds": method and route template
    fingerprint: str
    ttl_seconds: int

    def values(self) -> tuple[str, str, str, int]:
        """$1-$4 of every statement that stores an answer (see STORE_ANSWER)."""
        return (self.key.key_hash, self.path, self.fingerprint, self.ttl_seconds)


# The CTE that stores an operation's answer with its key, in the operation's own statement. It
# reads the CTE `answer` (columns status, body) and takes the guard's values as $1-$4.
STORE_ANSWER = """stored AS (
            INSERT INTO idempotency_keys
                   (key_hash, request_path, request_fingerprint, response_status, response_data,
                    expires_at)
            SELECT $1, $2, $3, answer.status, answer.body, now() + make_interval(secs => $4)
              FROM answer
        )"""


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: str  # the jsonb's text: byte-identical on every replay


def fingerprint(method: str, route: str, params: dict[str, Any], body: dict[str, Any]) -> str:
    """SHA-256 of the canonical request: method, route template, path params, body without key."""
    canonical = json.dumps(
        {"method": method, "route": route, "params": params, "body": body},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def request_path(method: str, route: str) -> str:
    return f"{method}:{route}"


async def claim_key(conn: asyncpg.Connection, guard: Guard) -> StoredResponse | None:
    """Take the key for this transaction: None when it is free, the stored answer when it is not.

    Raises 409 IDEMPOTENCY_KEY_IN_PROGRESS when another transaction holds it, and 422
    IDEMPOTENCY_KEY_REUSED when it was used for another request. An expired row is deleted so
    that the key counts as new.
    """
    row = await conn.fetchrow(
        """
        WITH lock AS (
            SELECT pg_try_advisory_xact_lock($1) AS acquired
        ), expired AS (
            DELETE FROM idempotency_keys
             WHERE key_hash = $2
               AND expires_at <= now()
               AND (SELECT acquired FROM lock)
        )
        SELECT lock.acquired,
               k.request_path,
               k.request_fingerprint,
               k.response_status,
               k.response_data
          FROM lock
          LEFT JOIN idempotency_keys AS k
                 ON k.key_hash = $2
                AND k.expires_at > now()
        """,
        guard.key.lock_id,
        guard.key.key_hash,
    )
    assert row is not None
    if not row["acquired"]:
        raise key_in_progress()
    if row["request_path"] is None:
        return None
    if row["request_path"] != guard.path or row["request_fingerprint"] != guard.fingerprint:
        raise key_reused()
    return StoredResponse(row["response_status"], row["response_data"])


async def insert_key_response(
    conn: asyncpg.Connection, guard: Guard, *, status: int, body: dict[str, Any]
) -> StoredResponse:
    """Store a business answer (e.g. a 4xx decided under the key) and return it as replayed."""
    stored = await conn.fetchval(
        f"""
        WITH answer AS (
            SELECT $5::int AS status, $6::jsonb AS body
        ), {STORE_ANSWER}
        SELECT body FROM answer
        """,
        *guard.values(),
        status,
        body,
    )
    return StoredResponse(status, stored)


def key_in_progress() -> APIError:
    return APIError(
        409,
        "IDEMPOTENCY_KEY_IN_PROGRESS",
        "A request with this idempotency key is still being processed; retry shortly.",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def key_reused() -> APIError:
    return APIError(
        422,
        "IDEMPOTENCY_KEY_REUSED",
        "This idempotency key was already used for a different request; use a new key.",
    )
