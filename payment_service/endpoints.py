"""Subscribed endpoints (table `endpoints`): what every process knows about them, and their SQL.

An endpoint is one downstream service's callback URL with its event types, signing secret(s),
state (ACTIVE, PAUSED, DISABLED) and health (the breaker, kept in the row so that every relay
shares it). The command line (`payment-service endpoints …`) and the admin API manage endpoints
through these functions; the API's write statement reads the table to fan an event out; the
relay reads it to deliver. Every change NOTIFYs ENDPOINTS_CHANNEL, so running relays reload at
once (they also reload every second).

What an endpoint may have is checked here (`check_name`, `check_url`, `check_event_types`,
`check_secret`, `check_reason`), once for the command line and the admin API; a URL passes only
if the relay can send to it (payment_service.callback_urls).

Removing an endpoint (`delete_endpoint`) deletes what it was never delivered and keeps its
delivered deliveries as history (`endpoint_id` NULL, its name in `removed_endpoint`) until
housekeeping deletes them with the rest.

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
from payment_service.callback_urls import (
    MAX_URL_LENGTH,
    CallbackURLError,
    NetworkPolicy,
    parse_callback_url,
    refusal_message,
)
from payment_service.config import Settings
from payment_service.signing import SECRET_PREFIX
from payment_service.sql import Statement
from payment_service.vocabulary import ENDPOINT_STATES, event_type_patterns

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_SECRET_LENGTH = 200  # characters of `whsec_…`
MAX_REASON_LENGTH = 500  # characters of a pause or disable reason
SECRET_BYTES = 32
PREVIOUS_SECRET_SECONDS = 24 * 3600  # `rotate-secret`: a retired secret signs this long
# The current secret and those retired in the last PREVIOUS_SECRET_SECONDS, newest first, at most
# this many in all: the SQL function `retire_secret` (migration 0008) keeps them so.
MAX_SIGNING_SECRETS = 3
MAX_BREAKER_COOLDOWN_SECONDS = 600.0


class EndpointError(ValueError):
    """A request about endpoints that cannot be carried out; the message says why."""


class InvalidEndpoint(EndpointError):
    """A value an endpoint cannot have (`field` names it); the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


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


# The checks of what an endpoint may have, the same for the command line and the admin API (whose
# request models call them): each returns the value, or raises InvalidEndpoint naming the field.
def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidEndpoint(
            "name",
            f"invalid endpoint name {name[:80]!r}: 1-63 lower-case letters, digits, '_' or '-'",
        )
    return name


def check_url(url: str, networks: NetworkPolicy | None = None) -> str:
    """A URL the relay can send callbacks to (payment_service.callback_urls), without
    credentials or a fragment, at most MAX_URL_LENGTH characters; with `networks`, a host written
    as an address (or `localhost`) must be one callbacks may reach. The message never repeats
    the URL: it may hold a password."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidEndpoint(
            "url", f"invalid endpoint URL: longer than {MAX_URL_LENGTH} characters"
        )
    try:
        parsed = parse_callback_url(url)
    except CallbackURLError as error:
        raise InvalidEndpoint("url", f"invalid endpoint URL: {error}") from None
    if parsed.has_credentials:
        raise InvalidEndpoint(
            "url",
            "invalid endpoint URL: credentials (user:password@) do not belong in it; receivers "
            "verify the callbacks' signatures instead",
        )
    if parsed.has_fragment:
        raise InvalidEndpoint("url", "invalid endpoint URL: a fragment (#…) is never sent")
    if networks is not None:
        address = parsed.address
        kind = None if address is None else networks.refusal(address)
        if kind is not None and address is not None:
            raise InvalidEndpoint(
                "url", f"refused endpoint URL: {refusal_message(parsed.host, address, kind)}"
            )
        if networks.refuses_name(parsed.host):
            raise InvalidEndpoint(
                "url",
                f"refused endpoint URL: {parsed.host} is a loopback address, where callbacks may "
                "not go: list its network in ENDPOINT_ALLOWED_NETWORKS to allow it",
            )
    return url


def check_event_types(types: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Exact event types, `payment.*`-style prefixes, or `*`; at least one, at most
    MAX_EVENT_TYPES; no duplicates (payment_service.vocabulary.event_type_patterns)."""
    try:
        return event_type_patterns(types)
    except ValueError as error:
        raise InvalidEndpoint("event_types", str(error)) from None


def check_secret(secret: str) -> str:
    """`whsec_` + base64 of at least 24 bytes (Standard Webhooks), at most MAX_SECRET_LENGTH
    characters. The message never repeats the secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidEndpoint(
            "secret", "a secret is 'whsec_' followed by base64 (Standard Webhooks)"
        )
    if len(secret) > MAX_SECRET_LENGTH:
        raise InvalidEndpoint("secret", f"a secret is at most {MAX_SECRET_LENGTH} characters")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except ValueError:
        raise InvalidEndpoint(
            "secret", "the part of the secret after 'whsec_' is not valid base64"
        ) from None
    if len(key) < 24:
        raise InvalidEndpoint("secret", "a secret's key must be at least 24 random bytes")
    return secret


def check_reason(reason: str) -> str:
    """Why an endpoint is paused or disabled: shown by `list` and the admin API, so plain text
    (no control characters), at most MAX_REASON_LENGTH characters."""
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidEndpoint("reason", f"a reason is at most {MAX_REASON_LENGTH} characters")
    if re.search(r"[\x00-\x1f\x7f-\x9f]", reason):
        raise InvalidEndpoint("reason", "a reason is one line of text, without control characters")
    return reason


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


SELECT_ALL = Statement(f"SELECT {_COLUMNS} FROM endpoints ORDER BY name")
SELECT_ONE = Statement(f"SELECT {_COLUMNS} FROM endpoints WHERE name = :name")
# The endpoint, its row locked until the transaction ends.
LOCK_ONE = Statement(f"SELECT {_COLUMNS} FROM endpoints WHERE name = :name FOR UPDATE")


async def select_endpoints(conn: asyncpg.Connection) -> list[Endpoint]:
    """Every endpoint, by name."""
    rows = await conn.fetch(SELECT_ALL.sql, *SELECT_ALL.args())
    return [_endpoint(row) for row in rows]


async def select_endpoint(conn: asyncpg.Connection, name: str) -> Endpoint:
    row = await conn.fetchrow(SELECT_ONE.sql, *SELECT_ONE.args(name=name))
    if row is None:
        raise EndpointNotFound(f"no endpoint named {name[:80]!r}")
    return _endpoint(row)


INSERT = Statement(
    f"""
    WITH added AS (
        INSERT INTO endpoints (name, url, event_types, secret)
        VALUES (:name, :url, :event_types, :secret)
        ON CONFLICT (name) DO NOTHING
     RETURNING *
    ), notified AS (
        SELECT pg_notify(:channel, name) FROM added
    )
    SELECT {_COLUMNS}, (SELECT count(*) FROM notified) AS notified
      FROM added
    """
)


async def insert_endpoint(
    conn: asyncpg.Connection,
    *,
    name: str,
    url: str,
    event_types: tuple[str, ...] = ("*",),
    secret: str | None = None,
    networks: NetworkPolicy | None = None,
) -> Endpoint:
    """Add an endpoint; it receives events written from now on (`secret` None: generated).
    `networks`: where callbacks may go (`check_url`), given by the command line and the API."""
    values = INSERT.args(
        name=check_name(name),
        url=check_url(url, networks),
        event_types=list(check_event_types(event_types)),
        secret=check_secret(secret) if secret is not None else new_secret(),
        channel=ENDPOINTS_CHANNEL,
    )
    row = await conn.fetchrow(INSERT.sql, *values)
    if row is None:
        raise EndpointExists(f"an endpoint named {name!r} exists already")
    return _endpoint(row)


def _changing(assignments: str) -> Statement:
    """`UPDATE endpoints SET <assignments>` of the endpoint named `:name`, marked changed by hand
    (no longer as seeding made it), NOTIFYing `:channel`."""
    return Statement(
        f"""
        WITH changed AS (
            UPDATE endpoints
               SET {assignments},
                   seeded = false,
                   updated_at = now()
             WHERE name = :name
         RETURNING *
        ), notified AS (
            SELECT pg_notify(:channel, name) FROM changed
        )
        SELECT {_COLUMNS}, (SELECT count(*) FROM notified) AS notified
          FROM changed
        """
    )


async def _change(
    conn: asyncpg.Connection, change: Statement, name: str, **values: Any
) -> Endpoint:
    """Run one of the `_changing` statements on the endpoint named `name`; EndpointNotFound if
    none."""
    row = await conn.fetchrow(
        change.sql, *change.args(name=name, channel=ENDPOINTS_CHANNEL, **values)
    )
    if row is None:
        raise EndpointNotFound(f"no endpoint named {name[:80]!r}")
    return _endpoint(row)


# What is not given (NULL) stays.
UPDATE = _changing(
    """url = coalesce(:url, url),
               event_types = coalesce(:event_types, event_types)"""
)


async def update_endpoint(
    conn: asyncpg.Connection,
    name: str,
    *,
    url: str | None = None,
    event_types: tuple[str, ...] | None = None,
    networks: NetworkPolicy | None = None,
) -> Endpoint:
    """Change an endpoint's URL and/or event types (what is not given stays)."""
    return await _change(
        conn,
        UPDATE,
        name,
        url=check_url(url, networks) if url is not None else None,
        event_types=list(check_event_types(event_types)) if event_types is not None else None,
    )


# The endpoint's deliveries waiting out a backoff go now, in order, rather than hours later (their
# schedule grew while the endpoint was down, paused or disabled). Run when `set_state` makes an
# endpoint ACTIVE, and by the relay when a breaker closes.
HASTEN = Statement(
    """
    UPDATE deliveries
       SET next_attempt_at = now()
     WHERE endpoint_id = :endpoint_id
       AND status = 'PENDING'
       AND next_attempt_at > now()
    """
)
# Its compiled text, which outbox_relay.endpoint_health runs with the endpoint's id as its one
# value by position, until that module moves to named values.
HASTEN_SQL = HASTEN.sql


async def set_state(
    conn: asyncpg.Connection, name: str, state: str, *, reason: str | None = None
) -> Endpoint:
    """PAUSED/ACTIVE/DISABLED by hand. Enabling or resuming also closes the breaker, starts the
    failure count afresh and makes every waiting delivery of the endpoint due now (HASTEN):
    the operator says the receiver is back, so everything goes out at once, in order."""
    if state not in ENDPOINT_STATES:
        raise EndpointError(f"unknown state {state!r}")
    async with conn.transaction():
        changed = await _set_state(conn, name, state, reason)
        if state == "ACTIVE":
            await conn.execute(HASTEN.sql, *HASTEN.args(endpoint_id=changed.endpoint_id))
    return changed


async def pause(conn: asyncpg.Connection, name: str, *, reason: str | None = None) -> Endpoint:
    """Hold the endpoint's deliveries until `resume`; its new events still get deliveries."""
    return await set_state(
        conn, name, "PAUSED", reason=None if reason is None else check_reason(reason)
    )


async def disable(conn: asyncpg.Connection, name: str, *, reason: str | None = None) -> Endpoint:
    """Hold the endpoint's deliveries until `enable`; its new events get none (see `Gap`)."""
    return await set_state(
        conn, name, "DISABLED", reason=None if reason is None else check_reason(reason)
    )


async def resume(conn: asyncpg.Connection, name: str) -> Endpoint:
    """Deliver again, in order, what a PAUSED endpoint held. A DISABLED one is refused: it
    missed events, which `enable` names."""
    async with conn.transaction():
        current = await _lock(conn, name)
        if current.state == "DISABLED":
            raise EndpointError(
                f"endpoint {name!r} is DISABLED ({current.state_reason or 'no reason given'}): "
                f"enable it instead (`payment-service endpoints enable {name}`), which names the "
                "events it missed"
            )
        return await set_state(conn, name, "ACTIVE")


@dataclass(frozen=True)
class Gap:
    """What an endpoint missed while DISABLED: the events of its types written since, which
    got no delivery to it. `replay_command` sends them."""

    name: str
    disabled_at: datetime
    missed_events: int

    @property
    def replay_command(self) -> str:
        since = self.disabled_at.isoformat()
        return f"payment-service outbox replay --endpoint {self.name} --since {since}"

    def public(self) -> dict[str, Any]:
        return {
            "disabled_at": self.disabled_at.isoformat(),
            "missed_events": self.missed_events,
            "replay_command": self.replay_command,
        }


# The events an endpoint has no delivery for, of its types, written since a time (`Gap`).
MISSED_EVENTS = Statement(
    """
    SELECT count(*)
      FROM outbox_events AS e
     WHERE e.created_at >= :since
       AND endpoint_wants(:event_types, e.event_type)
       AND NOT EXISTS (SELECT 1
                         FROM deliveries AS d
                        WHERE d.event_id = e.id
                          AND d.endpoint_id = :endpoint_id)
    """
)


async def enable(conn: asyncpg.Connection, name: str) -> tuple[Endpoint, Gap | None]:
    """ACTIVE again, breaker closed, held deliveries due now (`set_state`). After DISABLED, also
    the gap: when it was disabled and how many events it missed since (None otherwise). Refused
    while its URL is one the relay cannot deliver to (it would only be disabled again)."""
    async with conn.transaction():
        current = await _lock(conn, name)
        if current.url is not None:
            try:
                parse_callback_url(current.url)
            except CallbackURLError as error:  # the relay would only disable it again
                raise EndpointError(
                    f"endpoint {name!r} has a URL the relay cannot deliver to ({error}): give it "
                    f"another first (`payment-service endpoints update {name} --url …`)"
                ) from None
        gap = None
        if current.state == "DISABLED":
            values = MISSED_EVENTS.args(
                endpoint_id=current.endpoint_id,
                event_types=list(current.event_types),
                since=current.state_changed_at,
            )
            missed = await conn.fetchval(MISSED_EVENTS.sql, *values)
            gap = Gap(name, current.state_changed_at, int(missed))
        return await set_state(conn, name, "ACTIVE"), gap


async def _lock(conn: asyncpg.Connection, name: str) -> Endpoint:
    """The endpoint, its row locked until the transaction ends; EndpointNotFound if none."""
    row = await conn.fetchrow(LOCK_ONE.sql, *LOCK_ONE.args(name=name))
    if row is None:
        raise EndpointNotFound(f"no endpoint named {name[:80]!r}")
    return _endpoint(row)


# The relay's guard (outbox_relay.endpoint_loop): an endpoint it cannot deliver to is DISABLED
# with the reason, unless it changed since the relay read it (`:url`: the URL it read).
DISABLE_UNSERVABLE = Statement(
    """
    WITH disabled AS (
        UPDATE endpoints
           SET state = 'DISABLED',
               state_reason = :reason,
               state_changed_at = now(),
               updated_at = now()
         WHERE endpoint_id = :endpoint_id
           AND url = :url
           AND state = 'ACTIVE'
     RETURNING name
    )
    SELECT count(*) FROM disabled, pg_notify(:channel, disabled.name) AS notified
    """
)


async def disable_unservable(
    conn: asyncpg.Connection, endpoint_id: int, *, url: str, reason: str
) -> bool:
    """DISABLE an endpoint the relay cannot deliver to at `url`; False when it has changed
    (another URL, or no longer ACTIVE) or is gone."""
    values = DISABLE_UNSERVABLE.args(
        endpoint_id=endpoint_id, url=url, reason=reason, channel=ENDPOINTS_CHANNEL
    )
    done = await conn.fetchval(DISABLE_UNSERVABLE.sql, *values)
    return bool(done)


# A new state by hand; ACTIVE also closes the breaker and starts the failure count afresh.
SET_STATE = _changing(
    """state = :state,
               state_reason = :reason,
               state_changed_at = CASE WHEN state = :state THEN state_changed_at ELSE now() END,
               consecutive_failures = CASE WHEN :state = 'ACTIVE' THEN 0
                                           ELSE consecutive_failures END,
               breaker_open_until = CASE WHEN :state = 'ACTIVE' THEN NULL
                                         ELSE breaker_open_until END,
               breaker_cooldown_seconds = CASE WHEN :state = 'ACTIVE' THEN 0
                                               ELSE breaker_cooldown_seconds END,
               probe_until = CASE WHEN :state = 'ACTIVE' THEN NULL ELSE probe_until END,
               failing_since = CASE WHEN :state = 'ACTIVE' THEN NULL ELSE failing_since END"""
)


async def _set_state(
    conn: asyncpg.Connection, name: str, state: str, reason: str | None
) -> Endpoint:
    return await _change(conn, SET_STATE, name, state=state, reason=reason)


# A new secret; the current one is retired (the SQL function `retire_secret`, migration 0008).
ROTATE_SECRET = _changing(
    """previous_secrets = retire_secret(previous_secrets, secret, :secret, :keep_seconds),
               secret = :secret"""
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
        ROTATE_SECRET,
        name,
        secret=check_secret(secret) if secret is not None else new_secret(),
        keep_seconds=float(keep_previous_seconds),
    )


@dataclass(frozen=True)
class Removed:
    undelivered: int  # deliveries never delivered (pending or dead), deleted with the endpoint
    delivered: int  # delivered ones kept as history, under the endpoint's name, until retention


# What removing an endpoint does to its deliveries: those never delivered go, the delivered ones
# stay as history, under its name.
COUNT_UNDELIVERED = Statement(
    """
    SELECT count(*)
      FROM deliveries AS d
      JOIN endpoints AS n ON n.endpoint_id = d.endpoint_id
     WHERE n.name = :name
       AND d.status <> 'DELIVERED'
    """
)
DELETE_UNDELIVERED = Statement(
    "DELETE FROM deliveries WHERE endpoint_id = :endpoint_id AND status <> 'DELIVERED'"
)
KEEP_DELIVERED = Statement(
    """
    UPDATE deliveries
       SET endpoint_id = NULL,
           removed_endpoint = :name
     WHERE endpoint_id = :endpoint_id
    """
)
DELETE = Statement(
    """
    WITH gone AS (
        DELETE FROM endpoints WHERE endpoint_id = :endpoint_id RETURNING name
    )
    SELECT pg_notify(:channel, name) FROM gone
    """
)


async def count_undelivered(conn: asyncpg.Connection, name: str) -> int:
    """How many deliveries `delete_endpoint` would delete with the endpoint (pending and dead);
    EndpointNotFound if none has that name."""
    await select_endpoint(conn, name)
    return int(await conn.fetchval(COUNT_UNDELIVERED.sql, *COUNT_UNDELIVERED.args(name=name)))


async def delete_endpoint(conn: asyncpg.Connection, name: str) -> Removed:
    """Remove an endpoint. What it was never delivered goes with it; its delivered deliveries
    stay, as history, with `endpoint_id` NULL and the endpoint's name in `removed_endpoint`,
    until housekeeping deletes them with the rest (OUTBOX_RETENTION_HOURS)."""
    async with conn.transaction():
        endpoint = await _lock(conn, name)  # a concurrent delivery's write waits for us
        endpoint_id = endpoint.endpoint_id
        undelivered = await conn.execute(
            DELETE_UNDELIVERED.sql, *DELETE_UNDELIVERED.args(endpoint_id=endpoint_id)
        )
        delivered = await conn.execute(
            KEEP_DELIVERED.sql, *KEEP_DELIVERED.args(endpoint_id=endpoint_id, name=endpoint.name)
        )
        await conn.execute(
            DELETE.sql, *DELETE.args(endpoint_id=endpoint_id, channel=ENDPOINTS_CHANNEL)
        )
    return Removed(int(undelivered.split()[-1]), int(delivered.split()[-1]))


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
        unset = [name for name in OPTIONAL_SEEDS if name not in {seed.name for seed in seeds}]
        left = await conn.fetch(SEEDED_AMONG.sql, *SEEDED_AMONG.args(names=unset))
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


# Seeding's statements. Which of the endpoints `:names` seeding made and configured.
SEEDED_AMONG = Statement(
    "SELECT name FROM endpoints WHERE seeded AND url IS NOT NULL AND name = ANY (:names)"
)
# A missing endpoint, as the settings describe it.
SEED = Statement(
    """
    WITH seeded AS (
        INSERT INTO endpoints (name, url, event_types, secret, seeded)
        VALUES (:name, :url, :event_types, :secret, true)
        ON CONFLICT (name) DO NOTHING
     RETURNING name
    )
    SELECT name FROM seeded, pg_notify(:channel, name) AS n
    """
)
# An endpoint still as seeding made it (or not configured yet), made to follow the settings.
FOLLOW = Statement(
    """
    WITH followed AS (
        UPDATE endpoints
           SET url = :url,
               event_types = :event_types,
               -- unsigned now: no signature at all; else the replaced secret signs a day more
               previous_secrets = CASE WHEN :secret::text IS NULL THEN '[]'::jsonb
                                       WHEN secret IS DISTINCT FROM :secret
                                       THEN retire_secret(previous_secrets, secret, :secret,
                                                          :keep_seconds)
                                       ELSE previous_secrets END,
               secret = :secret,
               updated_at = now()
         WHERE endpoint_id = :endpoint_id
     RETURNING name
    )
    SELECT pg_notify(:channel, name) FROM followed
    """
)


async def _seed(conn: asyncpg.Connection, seed: EndpointSeed, secret: str | None) -> list[SeedNote]:
    described = {"url": seed.url, "event_types": list(seed.event_types), "secret": secret}
    created = await conn.fetchval(
        SEED.sql, *SEED.args(name=seed.name, **described, channel=ENDPOINTS_CHANNEL)
    )
    if created is not None:
        text = f"seeded endpoint {seed.name} from the settings: {shown_url(seed.url)}"
        return [SeedNote(seed.name, "created", text)]
    row = await conn.fetchrow(LOCK_ONE.sql, *LOCK_ONE.args(name=seed.name))
    if row is None:  # removed by an operator since the insert found it: nothing to follow
        return []
    endpoint = _endpoint(row)
    differences = _differences(endpoint, seed, secret)
    if not differences:
        return []
    if endpoint.url is not None and not endpoint.seeded:
        return [difference.differs(seed.name) for difference in differences]
    values = FOLLOW.args(
        endpoint_id=endpoint.endpoint_id,
        **described,
        keep_seconds=float(PREVIOUS_SECRET_SECONDS),
        channel=ENDPOINTS_CHANNEL,
    )
    await conn.execute(FOLLOW.sql, *values)
    if endpoint.url is None:
        text = f"configured endpoint {seed.name} from the settings: {shown_url(seed.url)}"
        return [SeedNote(seed.name, "configured", text)]
    return [difference.followed(seed.name) for difference in differences]
