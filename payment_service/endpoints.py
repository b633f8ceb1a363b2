"""Subscribed endpoints (table `endpoints`): what every process knows about them, and their SQL.

An endpoint is one downstream service's callback URL with its event types, signing secret(s),
state (ACTIVE, PAUSED, DISABLED) and health (the breaker, kept in the row so that every relay
shares it). The command line (`payment-service endpoints …`) and the admin API manage endpoints
through these functions; the API's write statement reads the table to fan an event out; the
relay reads it to deliver. Every change NOTIFYs ENDPOINTS_CHANNEL, so running relays reload at
once (they also reload every second).

Seeding: the integration guide's settings (`NOTIFICATION_SERVICE_URL`, `TRIP_SERVICE_URL` with
`TRIP_CALLBACK_PATH`, …, `CALLBACK_SIGNING_SECRET`) describe endpoints `notification`, `trip`,
`driver`, `rider`. `seed_from_settings` (at `migrate`, `run` and a relay's start) creates those
that are missing and makes those still as seeding made them follow the settings; once an operator
changes an endpoint (any change here but seeding sets `seeded` false) the settings no longer
apply to it, and seeding reports each difference instead.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from payment_service import ENDPOINTS_CHANNEL
from payment_service.config import Settings
from payment_service.signing import SECRET_PREFIX

EVENT_TYPES = (
    "payment.succeeded",
    "payment.pending",
    "payment.failed",
    "payment.refunded",
    "refund.failed",
)
STATES = ("ACTIVE", "PAUSED", "DISABLED")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SECRET_BYTES = 32
PREVIOUS_SECRET_SECONDS = 24 * 3600  # `rotate-secret`: a retired secret signs this long
# The current secret and those retired in the last PREVIOUS_SECRET_SECONDS, newest first, at most
# this many in all: the SQL function `retire_secret` (migration 0008) keeps them so.
MAX_SIGNING_SECRETS = 3
MAX_BREAKER_COOLDOWN_SECONDS = 600.0


class EndpointError(ValueError):
    """A request about endpoints that cannot be carried out; the message says why."""


class EndpointNotFound(EndpointError):
    """No endpoint has that name."""


class EndpointExists(EndpointError):
    """An endpoint has that name already."""


@dataclass(frozen=True)
class PreviousSecret:
    """A secret that `rotate-secret` retired: it signs too until `expires_at`."""

    secret: str
    expires_at: datetime


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: int
    name: str
    url: str | None  # None: not configured yet (seeding fills it in)
    event_types: tuple[str, ...]
    secret: str | None
    previous_secrets: tuple[PreviousSecret, ...]  # newest first, expired ones included
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

    def still_signing(self) -> list[PreviousSecret]:
        """The retired secrets that have not expired, newest first."""
        return [p for p in self.previous_secrets if p.expires_at > self.now]

    def signing_secrets(self) -> list[str]:
        """The secrets signing a callback now: the current one, then every retired one that has
        not expired, newest first (at most MAX_SIGNING_SECRETS in all)."""
        current = [self.secret] if self.secret else []
        return current + [p.secret for p in self.still_signing()]

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
            # When each retired secret that still signs stops, newest first: never the secrets.
            "previous_secrets_expire_at": [_iso(p.expires_at) for p in self.still_signing()],
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
    """Exact event types, `payment.*`-style prefixes (`refund.*` too), or `*`; at least one; no
    duplicates."""
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
    """An endpoint as the settings describe it, and the variables each part comes from."""

    name: str
    url: str
    event_types: tuple[str, ...]
    url_from: str  # e.g. "TRIP_SERVICE_URL + TRIP_CALLBACK_PATH"
    types_from: str  # e.g. "TRIP_EVENT_TYPES"


# The services seeded only when their *_CALLBACK_PATH is set (`notification` always is).
OPTIONAL_SEEDS = ("trip", "driver", "rider")


def seeds_from_settings(settings: Settings) -> list[EndpointSeed]:
    """The endpoints the integration guide's settings describe."""
    seeds = [
        EndpointSeed(
            "notification",
            settings.notification_url,
            ("*",),
            url_from="NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH",
            types_from="the settings (every event type)",
        )
    ]
    for name in OPTIONAL_SEEDS:
        path: str | None = getattr(settings, f"{name}_callback_path")
        if path is not None:
            base = str(getattr(settings, f"{name}_service_url")).rstrip("/")
            upper = name.upper()
            seeds.append(
                EndpointSeed(
                    name,
                    base + path,
                    getattr(settings, f"{name}_event_types"),
                    url_from=f"{upper}_SERVICE_URL + {upper}_CALLBACK_PATH",
                    types_from=f"{upper}_EVENT_TYPES",
                )
            )
    return seeds


@dataclass(frozen=True)
class SeedNote:
    """One line about what seeding did to an endpoint, or found different from the settings, for
    the log and the person starting the service. It never holds a secret."""

    endpoint: str
    action: Literal["created", "configured", "followed", "differs", "left"]
    text: str

    @property
    def warning(self) -> bool:
        """An endpoint an operator changed (or seeding left behind) that the settings disagree
        with: the settings do not apply to it, and whoever starts the service should know."""
        return self.action in ("differs", "left")


@dataclass(frozen=True)
class _Difference:
    """How an endpoint and its seed differ in one part, in words that never show a secret."""

    source: str  # the settings it comes from
    now: str  # "url http://a → http://b": what following the settings changes
    apart: str  # "url http://a, the settings say http://b": what differs, when not followed
    change: str  # the `payment-service endpoints …` command that changes the endpoint

    def followed(self, name: str) -> SeedNote:
        return SeedNote(name, "followed", f"endpoint {name} follows {self.source}: {self.now}")

    def differs(self, name: str) -> SeedNote:
        return SeedNote(
            name,
            "differs",
            f"endpoint {name} differs from {self.source}: {self.apart} (set by an operator; "
            f"`payment-service endpoints {self.change}` to change it)",
        )


def _differences(endpoint: Endpoint, seed: EndpointSeed, secret: str | None) -> list[_Difference]:
    found: list[_Difference] = []
    name = endpoint.name
    if endpoint.url != seed.url:
        old, new = shown_url(endpoint.url), shown_url(seed.url)
        found.append(
            _Difference(
                seed.url_from,
                f"url {old} → {new}",
                f"url {old}, the settings say {new}",
                f"update {name} --url …",
            )
        )
    if set(endpoint.event_types) != set(seed.event_types):
        old, new = ",".join(endpoint.event_types), ",".join(seed.event_types)
        found.append(
            _Difference(
                seed.types_from,
                f"event types {old} → {new}",
                f"event types {old}, the settings say {new}",
                f"update {name} --events …",
            )
        )
    if endpoint.secret != secret:
        if secret is None:
            now, apart = "secret removed: callbacks are unsigned", "its callbacks are signed"
        elif endpoint.secret is None:
            now, apart = "secret set: callbacks are signed", "its callbacks are unsigned"
        else:
            now = "secret replaced (the one replaced signs for 24 h more)"
            apart = "it signs with another secret"
        found.append(
            _Difference("CALLBACK_SIGNING_SECRET", now, apart, f"rotate-secret {name} --secret …")
        )
    return found


def shown_url(url: str | None) -> str:
    """A URL as logs show it: without a user name or password."""
    if url is None:
        return "(none)"
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# -- SQL ------------------------------------------------------------------------------------------
_COLUMNS = """endpoint_id, name, url, event_types, secret, previous_secrets, state,
              state_reason, state_changed_at,
              consecutive_failures, breaker_open_until, breaker_cooldown_seconds, failing_since,
              last_success_at, seeded, created_at, updated_at, now() AS now"""


def _endpoint(row: asyncpg.Record) -> Endpoint:
    values = dict(row)
    values.pop("notified", None)  # the statements that NOTIFY read their CTE this way
    values["event_types"] = tuple(values["event_types"])
    values["previous_secrets"] = tuple(
        PreviousSecret(entry["secret"], datetime.fromisoformat(entry["expires_at"]))
        for entry in json.loads(values["previous_secrets"])
    )
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
    """A new signing secret. The current one keeps signing for `keep_previous_seconds`, and so do
    those retired before it that have not expired, up to MAX_SIGNING_SECRETS in all (the oldest
    goes first): rotating twice in a day never drops the secret receivers still verify with."""
    return await _change(
        conn,
        name,
        """previous_secrets = retire_secret(previous_secrets, secret, $3, $4),
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


async def seed_from_settings(conn: asyncpg.Connection, settings: Settings) -> list[SeedNote]:
    """Make the endpoints the settings describe (seeds_from_settings) follow them.

    A missing endpoint is created; one without a URL (migration 0006 leaves `notification` so) is
    configured; one still as seeding made it (`seeded`) follows the settings: its URL, event types
    and secret (CALLBACK_SIGNING_SECRET; a replaced secret signs 24 h more, as after
    `rotate-secret`). An endpoint an operator changed is left alone, and each part in which it
    differs from the settings is a warning; so is a seeded endpoint whose *_CALLBACK_PATH is no
    longer set (it stays). Runs in one transaction, which takes the rows' locks, so that
    processes starting together make each change once. Returns what it did and found, in order.
    """
    secret = settings.callback_signing_secret
    notes: list[SeedNote] = []
    async with conn.transaction():
        seeds = seeds_from_settings(settings)
        for seed in seeds:
            notes += await _seed(conn, seed, secret)
        left = await conn.fetch(
            "SELECT name FROM endpoints WHERE seeded AND url IS NOT NULL AND name = ANY ($1)",
            [name for name in OPTIONAL_SEEDS if name not in {seed.name for seed in seeds}],
        )
        for row in left:
            name = row["name"]
            notes.append(
                SeedNote(
                    name,
                    "left",
                    f"endpoint {name} was seeded from {name.upper()}_CALLBACK_PATH, which is not "
                    f"set now: it stays as it is (`payment-service endpoints remove {name} --yes` "
                    "removes it)",
                )
            )
    return notes


async def _seed(conn: asyncpg.Connection, seed: EndpointSeed, secret: str | None) -> list[SeedNote]:
    created = await conn.fetchval(
        """
        WITH seeded AS (
            INSERT INTO endpoints (name, url, event_types, secret, seeded)
            VALUES ($1, $2, $3, $4, true)
            ON CONFLICT (name) DO NOTHING
         RETURNING name
        )
        SELECT name FROM seeded, pg_notify($5, name) AS n
        """,
        seed.name,
        seed.url,
        list(seed.event_types),
        secret,
        ENDPOINTS_CHANNEL,
    )
    if created is not None:
        text = f"seeded endpoint {seed.name} from the settings: {shown_url(seed.url)}"
        return [SeedNote(seed.name, "created", text)]
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM endpoints WHERE name = $1 FOR UPDATE", seed.name
    )
    if row is None:  # removed by an operator since the insert found it: nothing to follow
        return []
    endpoint = _endpoint(row)
    differences = _differences(endpoint, seed, secret)
    if not differences:
        return []
    if endpoint.url is not None and not endpoint.seeded:
        return [difference.differs(seed.name) for difference in differences]
    await conn.execute(
        """
        WITH followed AS (
            UPDATE endpoints
               SET url = $2,
                   event_types = $3,
                   -- unsigned now: no signature at all; else the replaced secret signs a day more
                   previous_secrets = CASE WHEN $4::text IS NULL THEN '[]'::jsonb
                                           WHEN secret IS DISTINCT FROM $4
                                           THEN retire_secret(previous_secrets, secret, $4, $5)
                                           ELSE previous_secrets END,
                   secret = $4,
                   updated_at = now()
             WHERE endpoint_id = $1
         RETURNING name
        )
        SELECT pg_notify($6, name) FROM followed
        """,
        endpoint.endpoint_id,
        seed.url,
        list(seed.event_types),
        secret,
        float(PREVIOUS_SECRET_SECONDS),
        ENDPOINTS_CHANNEL,
    )
    if endpoint.url is None:
        text = f"configured endpoint {seed.name} from the settings: {shown_url(seed.url)}"
        return [SeedNote(seed.name, "configured", text)]
    return [difference.followed(seed.name) for difference in differences]
