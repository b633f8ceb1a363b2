"""Subscribed endpoints (table `endpoints`): what every process knows about them, and their SQL.

An endpoint is one downstream service's callback URL with its event types, signing secret(s),
state (ACTIVE, PAUSED, DISABLED) and health (the breaker, kept in the row so that every relay
shares it). The command line (`payment-service endpoints …`) and the admin API manage endpoints
through these functions; the API's write statement reads the table to fan an event out; the
relay reads it to deliver. Every change NOTIFYs ENDPOINTS_CHANNEL, so running relays reload at
once (they also reload every second).

Seeding: the integration guide's settings (`NOTIFICATION_SERVICE_URL`, `TRIP_SERVICE_URL` with
`TRIP_CALLBACK_PATH`, …) describe endpoints `notification`, `trip`, `driver`, `rider`.
`seed_from_settings` creates those that are missing and fills in one that migration 0006 left
unconfigured; it never changes an endpoint that exists in any other way (`endpoints update` does).
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from payment_service import ENDPOINTS_CHANNEL
from payment_service.config import Settings
from payment_service.signing import SECRET_PREFIX

EVENT_TYPES = ("payment.succeeded", "payment.pending", "payment.failed", "payment.refunded")
STATES = ("ACTIVE", "PAUSED", "DISABLED")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SECRET_BYTES = 32
PREVIOUS_SECRET_SECONDS = 24 * 3600  # `rotate-secret`: the old secret stays valid this long
MAX_BREAKER_COOLDOWN_SECONDS = 600.0


class EndpointError(ValueError):
    """A request about endpoints that cannot be carried out; the message says why."""


class EndpointNotFound(EndpointError):
    """No endpoint has that name."""


class EndpointExists(EndpointError):
    """An endpoint has that name already."""


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: int
    name: str
    url: str | None  # None: not configured yet (seeding fills it in)
    event_types: tuple[str, ...]
    secret: str | None
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    state: str
    state_reason: str | None
    state_changed_at: datetime
    consecutive_failures: int
    breaker_open_until: datetime | None
    breaker_cooldown_seconds: float
    failing_since: datetime | None
    last_success_at: datetime | None
    seeded: bool
    created_at: datetime
    updated_at: datetime
    now: datetime  # the database's clock when the row was read

    @property
    def breaker(self) -> str:
        """`closed`, `open` (waiting for its cooldown) or `half_open` (one probe may go)."""
        if self.breaker_open_until is None:
            return "closed"
        return "open" if self.breaker_open_until > self.now else "half_open"

    def signing_secrets(self) -> list[str]:
        """The secrets signing a callback now: the current one, then a previous one still valid."""
        valid = [self.secret] if self.secret else []
        if (
            self.previous_secret
            and self.previous_secret_expires_at is not None
            and self.previous_secret_expires_at > self.now
        ):
            valid.append(self.previous_secret)
        return valid

    def public(self) -> dict[str, Any]:
        """What `endpoints list --json` and the admin API show: everything but the secrets."""
        return {
            "name": self.name,
            "url": self.url,
            "event_types": list(self.event_types),
            "state": self.state,
            "state_reason": self.state_reason,
            "breaker": self.breaker,
            "consecutive_failures": self.consecutive_failures,
            "signed": self.secret is not None,
            "previous_secret_expires_at": _iso(self.previous_secret_expires_at)
            if self.signing_secrets()[1:]
            else None,
            "failing_since": _iso(self.failing_since),
            "last_success_at": _iso(self.last_success_at),
            "seeded": self.seeded,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# -- pure helpers ---------------------------------------------------------------------------------
def new_secret() -> str:
    """A fresh Standard Webhooks secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise EndpointError(
            f"invalid endpoint name {name[:80]!r}: 1-63 lower-case letters, digits, '_' or '-'"
        )
    return name


def check_url(url: str) -> str:
    if not re.fullmatch(r"https?://[^\s/?#]+[^\s]*", url):
        raise EndpointError(f"invalid endpoint URL {url[:200]!r}: use http(s)://host[:port]/path")
    return url


def check_event_types(types: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Exact event types, `payment.*`-style prefixes, or `*`; at least one; no duplicates."""
    cleaned = tuple(dict.fromkeys(t.strip() for t in types if t.strip()))
    if not cleaned:
        raise EndpointError("an endpoint subscribes to at least one event type (or '*')")
    for pattern in cleaned:
        if pattern == "*" or pattern in EVENT_TYPES:
            continue
        if pattern.endswith(".*") and any(t.startswith(pattern[:-1]) for t in EVENT_TYPES):
            continue
        raise EndpointError(
            f"unknown event type {pattern[:80]!r}: use {', '.join(EVENT_TYPES)}, a prefix such "
            "as 'payment.*', or '*'"
        )
    return cleaned


def check_secret(secret: str) -> str:
    if not secret.startswith(SECRET_PREFIX):
        raise EndpointError("a secret is 'whsec_' followed by base64 (Standard Webhooks)")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except ValueError:
        raise EndpointError("the part of the secret after 'whsec_' is not valid base64") from None
    if len(key) < 24:
        raise EndpointError("a secret's key must be at least 24 random bytes")
    return secret


def wants(event_types: tuple[str, ...], event_type: str) -> bool:
    """Python's twin of the SQL function `endpoint_wants` (migration 0006)."""
    return any(
        pattern in ("*", event_type)
        or (pattern.endswith(".*") and event_type.startswith(pattern[:-1]))
        for pattern in event_types
    )


@dataclass(frozen=True)
class EndpointSeed:
    name: str
    url: str
    event_types: tuple[str, ...]


def seeds_from_settings(settings: Settings) -> list[EndpointSeed]:
    """The endpoints the integration guide's settings describe."""
    seeds = [EndpointSeed("notification", settings.notification_url, ("*",))]
    for name, base, path, types in (
        ("trip", settings.trip_service_url, settings.trip_callback_path, settings.trip_event_types),
        (
            "driver",
            settings.driver_service_url,
            settings.driver_callback_path,
            settings.driver_event_types,
        ),
        (
            "rider",
            settings.rider_service_url,
            settings.rider_callback_path,
            settings.rider_event_types,
        ),
    ):
        if path is not None:
            seeds.append(EndpointSeed(name, str(base).rstrip("/") + path, types))
    return seeds


# -- SQL ------------------------------------------------------------------------------------------
_COLUMNS = """endpoint_id, name, url, event_types, secret, previous_secret,
              previous_secret_expires_at, state, state_reason, state_changed_at,
              consecutive_failures, breaker_open_until, breaker_cooldown_seconds, failing_since,
              last_success_at, seeded, created_at, updated_at, now() AS now"""


def _endpoint(row: asyncpg.Record) -> Endpoint:
    values = dict(row)
    values.pop("notified", None)  # the statements that NOTIFY read their CTE this way
    values["event_types"] = tuple(values["event_types"])
    return Endpoint(**values)


async def select_endpoints(conn: asyncpg.Connection) -> list[Endpoint]:
    """Every endpoint, by name."""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM endpoints ORDER BY name")
    return [_endpoint(row) for row in rows]


async def select_endpoint(conn: asyncpg.Connection, name: str) -> Endpoint:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM endpoints WHERE name = $1", name)
    if row is None:
        raise EndpointNotFound(f"no endpoint named {name[:80]!r}")
    return _endpoint(row)


async def insert_endpoint(
    conn: asyncpg.Connection,
    *,
    name: str,
    url: str,
    event_types: tuple[str, ...] = ("*",),
    secret: str | None = None,
) -> Endpoint:
    """Add an endpoint; it receives events written from now on (`secret` None: generated)."""
    row = await conn.fetchrow(
        f"""
        WITH added AS (
            INSERT INTO endpoints (name, url, event_types, secret)
            VALUES ($1, $2, $3, $4)
            ON CONFLICT (name) DO NOTHING
         RETURNING *
        ), notified AS (
            SELECT pg_notify($5, name) FROM added
        )
        SELECT {_COLUMNS}, (SELECT count(*) FROM notified) AS notified
          FROM added
        """,
        check_name(name),
        check_url(url),
        list(check_event_types(event_types)),
        check_secret(secret) if secret is not None else new_secret(),
        ENDPOINTS_CHANNEL,
    )
    if row is None:
        raise EndpointExists(f"an endpoint named {name!r} exists already")
    return _endpoint(row)


async def _change(
    conn: asyncpg.Connection, name: str, assignments: str, *args: Any, where: str = "TRUE"
) -> Endpoint:
    """Run `UPDATE endpoints SET <assignments>` on one endpoint (args from $3), mark it changed by
    hand, and NOTIFY. Raises EndpointNotFound, or EndpointError when `where` excludes the row."""
    row = await conn.fetchrow(
        f"""
        WITH changed AS (
            UPDATE endpoints
               SET {assignments},
                   seeded = false,
                   updated_at = now()
             WHERE name = $1
               AND ({where})
         RETURNING *
        ), notified AS (
            SELECT pg_notify($2, name) FROM changed
        )
        SELECT {_COLUMNS}, (SELECT count(*) FROM notified) AS notified
          FROM changed
        """,
        name,
        ENDPOINTS_CHANNEL,
        *args,
    )
    if row is None:
        await select_endpoint(conn, name)  # raises EndpointNotFound
        raise EndpointError(f"endpoint {name!r} is not in a state that allows this")
    return _endpoint(row)


async def update_endpoint(
    conn: asyncpg.Connection,
    name: str,
    *,
    url: str | None = None,
    event_types: tuple[str, ...] | None = None,
) -> Endpoint:
    """Change an endpoint's URL and/or event types (what is not given stays)."""
    return await _change(
        conn,
        name,
        "url = coalesce($3, url), event_types = coalesce($4, event_types)",
        check_url(url) if url is not None else None,
        list(check_event_types(event_types)) if event_types is not None else None,
    )


# The endpoint's deliveries waiting out a backoff go now, in order, rather than hours later (their
# schedule grew while the endpoint was down, paused or disabled): `$1` the endpoint. Run when
# `set_state` makes an endpoint ACTIVE, and by the relay when a breaker closes.
HASTEN_SQL = """
UPDATE deliveries
   SET next_attempt_at = now()
 WHERE endpoint_id = $1
   AND status = 'PENDING'
   AND next_attempt_at > now()
"""


async def set_state(
    conn: asyncpg.Connection, name: str, state: str, *, reason: str | None = None
) -> Endpoint:
    """PAUSED/ACTIVE/DISABLED by hand. Enabling or resuming also closes the breaker, starts the
    failure count afresh and makes every waiting delivery of the endpoint due now (HASTEN_SQL):
    the operator says the receiver is back, so everything goes out at once, in order."""
    if state not in STATES:
        raise EndpointError(f"unknown state {state!r}")
    async with conn.transaction():
        changed = await _set_state(conn, name, state, reason)
        if state == "ACTIVE":
            await conn.execute(HASTEN_SQL, changed.endpoint_id)
    return changed


async def _set_state(
    conn: asyncpg.Connection, name: str, state: str, reason: str | None
) -> Endpoint:
    return await _change(
        conn,
        name,
        """state = $3,
           state_reason = $4,
           state_changed_at = CASE WHEN state = $3 THEN state_changed_at ELSE now() END,
           consecutive_failures = CASE WHEN $3 = 'ACTIVE' THEN 0 ELSE consecutive_failures END,
           breaker_open_until = CASE WHEN $3 = 'ACTIVE' THEN NULL ELSE breaker_open_until END,
           breaker_cooldown_seconds = CASE WHEN $3 = 'ACTIVE' THEN 0
                                           ELSE breaker_cooldown_seconds END,
           probe_until = CASE WHEN $3 = 'ACTIVE' THEN NULL ELSE probe_until END,
           failing_since = CASE WHEN $3 = 'ACTIVE' THEN NULL ELSE failing_since END""",
        state,
        reason,
    )


async def rotate_secret(
    conn: asyncpg.Connection,
    name: str,
    *,
    secret: str | None = None,
    keep_previous_seconds: float = PREVIOUS_SECRET_SECONDS,
) -> Endpoint:
    """A new signing secret; the current one stays valid (both signatures sent) for a while."""
    return await _change(
        conn,
        name,
        """previous_secret = secret,
           previous_secret_expires_at = CASE WHEN secret IS NULL THEN NULL
                                             ELSE now() + make_interval(secs => $4) END,
           secret = $3""",
        check_secret(secret) if secret is not None else new_secret(),
        float(keep_previous_seconds),
    )


async def delete_endpoint(conn: asyncpg.Connection, name: str) -> int:
    """Remove an endpoint and its deliveries; returns how many undelivered ones went with it."""
    row = await conn.fetchrow(
        """
        WITH gone AS (
            DELETE FROM endpoints WHERE name = $1 RETURNING endpoint_id, name
        ), notified AS (
            SELECT pg_notify($2, name) FROM gone
        )
        SELECT (SELECT count(*) FROM notified) AS found,
               (SELECT count(*)
                  FROM deliveries AS d, gone
                 WHERE d.endpoint_id = gone.endpoint_id
                   AND d.status <> 'DELIVERED') AS undelivered
        """,
        name,
        ENDPOINTS_CHANNEL,
    )
    assert row is not None
    if not row["found"]:
        raise EndpointNotFound(f"no endpoint named {name[:80]!r}")
    return int(row["undelivered"])  # the statement's snapshot still sees the cascaded rows


async def seed_from_settings(conn: asyncpg.Connection, settings: Settings) -> list[str]:
    """Create the missing seeded endpoints; configure the one migration 0006 left without a URL.

    An endpoint that has a URL is never changed, whatever the settings say now. Seeded endpoints
    are signed with CALLBACK_SIGNING_SECRET (unsigned when it is unset). Returns the names
    created or configured.
    """
    done: list[str] = []
    for seed in seeds_from_settings(settings):
        name = await conn.fetchval(
            """
            WITH seeded AS (
                INSERT INTO endpoints (name, url, event_types, secret, seeded)
                VALUES ($1, $2, $3, $4, true)
                ON CONFLICT (name) DO UPDATE
                   SET url = EXCLUDED.url,
                       event_types = EXCLUDED.event_types,
                       secret = EXCLUDED.secret,
                       updated_at = now()
                 WHERE endpoints.url IS NULL
             RETURNING name
            )
            SELECT name FROM seeded, pg_notify($5, name) AS n
            """,
            seed.name,
            seed.url,
            list(seed.event_types),
            settings.callback_signing_secret,
            ENDPOINTS_CHANNEL,
        )
        if name is not None:
            done.append(name)
    return done
