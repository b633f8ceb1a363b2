"""Idempotency keys: hashing, request fingerprints, claiming a key, storing and replaying answers.

A key's row is written in the same transaction as the operation it guards. An operation decided
in that transaction stores its answer with it, so a 5xx (rolled back) stores nothing. One that
goes to the payment gateway stores the key without an answer (the operation is staged, its calls
are made after the commit), and its answer is filled in by the transaction that writes the
gateway's result (payment_service.money): until then the key is in progress. While an operation's
transaction runs, it holds `pg_try_advisory_xact_lock(lock_id)`; a concurrent request with the
same key fails to take it, or finds the key in progress, and is answered 409 at once.

Keys are scoped per caller (the `API_KEYS` name; `default` when auth is off): the row's primary
key and the advisory lock are of (caller, key), so two callers sending the same key never replay,
see or block each other's requests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.errors import APIError
from payment_service import exact_json
from payment_service.config import DEFAULT_CALLER
from payment_service.money.fragments import STORE_ANSWER
from payment_service.sql import Statement

RETRY_AFTER_SECONDS = "1"


@dataclass(frozen=True)
class IdempotencyKey:
    """A caller's key and what we derive from it."""

    key_hash: str  # hex SHA-256 of the key as sent: the seed's encode(digest(key,'sha256'),'hex')
    caller: str  # the scope: the API_KEYS name of the caller
    lock_id: int  # signed int64 advisory-lock key of (caller, key); see from_key

    @classmethod
    def from_key(cls, key: str, caller: str = DEFAULT_CALLER) -> IdempotencyKey:
        """The lock id is the first 8 bytes of SHA-256 of the key for the `default` caller (as
        before callers existed, so an API of the previous version, still running during a rolling
        upgrade, takes the same lock), and of `caller NUL key` for a named caller (names and keys
        have no NUL, so distinct pairs never share the hashed text)."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        scoped = (
            digest
            if caller == DEFAULT_CALLER
            else hashlib.sha256(f"{caller}\0{key}".encode()).digest()
        )
        return cls(digest.hex(), caller, int.from_bytes(scoped[:8], "big", signed=True))


@dataclass(frozen=True)
class Guard:
    """What an operation needs to know about its idempotency key."""

    key: IdempotencyKey
    path: str  # "POST:/payments/{payment_id}/refunds": method and route template
    fingerprint: str
    ttl_seconds: int

    def params(self) -> dict[str, Any]:
        """The named values of the fragments below (all but TRY_LOCK's `lock_id`)."""
        return {
            "key_hash": self.key.key_hash,
            "caller": self.key.caller,
            "request_path": self.path,
            "request_fingerprint": self.fingerprint,
            "ttl_seconds": self.ttl_seconds,
        }


# Fragments of the statements that take a key in the operation's own statement (here,
# app.payments, app.refunds; the answer stored with it is payment_service.money.fragments'
# STORE_ANSWER). Their placeholders are named (payment_service.sql) and filled from
# `Guard.params()`, plus `lock_id` (IdempotencyKey.lock_id) for TRY_LOCK.

# The CTE `lock` (column `acquired`): the key's transaction-scoped advisory lock, without waiting.
TRY_LOCK = "lock AS (SELECT pg_try_advisory_xact_lock(:lock_id) AS acquired)"

# An expression: the key has a row in this caller's scope, live or expired.
KEY_HAS_ROW = (
    "EXISTS (SELECT 1 FROM idempotency_keys WHERE key_hash = :key_hash AND caller = :caller)"
)


# The CTE `taken_key`: the key taken without an answer (its operation goes to the gateway), for
# each row of the CTE `source` (one).
def take_key(source: str) -> str:
    return f"""taken_key AS (
        INSERT INTO idempotency_keys
               (key_hash, caller, request_path, request_fingerprint, expires_at)
        SELECT :key_hash, :caller, :request_path, :request_fingerprint,
               now() + make_interval(secs => :ttl_seconds)
          FROM {source}
    )"""


# Takes the key: its lock, and its live row if any. An expired row is deleted (only under the
# lock), so that the key counts as new.
CLAIM_KEY = Statement(
    f"""
    WITH {TRY_LOCK}, expired AS (
        DELETE FROM idempotency_keys
         WHERE key_hash = :key_hash
           AND caller = :caller
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
             ON k.key_hash = :key_hash
            AND k.caller = :caller
            AND k.expires_at > now()
    """
)

# Stores an answer decided under the key (a business 4xx) and returns its body as stored.
STORE_DECIDED_ANSWER = Statement(
    f"""
    WITH answer AS (
        SELECT :status::int AS status, :body::jsonb AS body
    ), {STORE_ANSWER}
    SELECT body FROM answer
    """
)


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: str  # the jsonb's text: byte-identical on every replay


def fingerprint(method: str, route: str, params: dict[str, Any], body: dict[str, Any]) -> str:
    """SHA-256 of the canonical request: method, route template, path params, body without key.

    Numbers in `body` may be Decimals (metadata keeps them exact): they are written as numbers, so
    `{"x": 1.5}` and `{"x": "1.5"}` are different requests.
    """
    canonical = exact_json.dumps(
        {"method": method, "route": route, "params": params, "body": body},
        sort_keys=True,
        compact=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def request_path(method: str, route: str) -> str:
    return f"{method}:{route}"


async def claim_key(conn: asyncpg.Connection, guard: Guard) -> StoredResponse | None:
    """Take the key for this transaction: None when it is free, the stored answer when it is not.

    Raises 409 IDEMPOTENCY_KEY_IN_PROGRESS when another transaction holds it or its operation is
    still at the gateway (the key has no answer yet), and 422 IDEMPOTENCY_KEY_REUSED when it was
    used for another request. An expired row is deleted so that the key counts as new.
    """
    row = await conn.fetchrow(
        CLAIM_KEY.sql,
        *CLAIM_KEY.args(
            lock_id=guard.key.lock_id, key_hash=guard.key.key_hash, caller=guard.key.caller
        ),
    )
    assert row is not None
    if not row["acquired"]:
        raise key_in_progress()
    if row["request_path"] is None:
        return None
    if row["request_path"] != guard.path or row["request_fingerprint"] != guard.fingerprint:
        raise key_reused()
    if row["response_status"] is None:
        raise key_in_progress()
    return StoredResponse(row["response_status"], row["response_data"])


async def insert_key_response(
    conn: asyncpg.Connection, guard: Guard, *, status: int, body: dict[str, Any]
) -> StoredResponse:
    """Store a business answer (e.g. a 4xx decided under the key) and return it as replayed."""
    stored = await conn.fetchval(
        STORE_DECIDED_ANSWER.sql,
        *STORE_DECIDED_ANSWER.args(**guard.params(), status=status, body=body),
    )
    return StoredResponse(status, stored)


KEY_ANSWER = Statement(
    """
    SELECT response_status, response_data
      FROM idempotency_keys
     WHERE key_hash = :key_hash
       AND caller = :caller
       AND expires_at > now()
       AND response_status IS NOT NULL
    """
)


async def select_key_answer(
    conn: asyncpg.Connection, *, key_hash: str, caller: str
) -> StoredResponse | None:
    """A key's stored answer, if it has one (live)."""
    row = await conn.fetchrow(KEY_ANSWER.sql, *KEY_ANSWER.args(key_hash=key_hash, caller=caller))
    return None if row is None else StoredResponse(row["response_status"], row["response_data"])


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
