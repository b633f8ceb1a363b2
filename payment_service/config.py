"""Typed configuration, read once from the environment (and `.env`) at start-up."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal, NamedTuple
from urllib.parse import quote

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from payment_service.callback_urls import (
    LOOPBACK,
    CallbackURLError,
    CallbackURLRefused,
    Network,
    NetworkPolicy,
    check_callback_url,
    network_policy,
    parse_networks,
)
from payment_service.vocabulary import GATEWAY_METHODS, PAYMENT_METHODS, event_type_patterns

STRIPE_TEST_KEY_PREFIXES = ("sk_test_", "rk_test_")  # secret and restricted test-mode keys
STRIPE_LIVE_KEY_PREFIXES = ("sk_live_", "rk_live_")  # and live-mode ones: real money
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# API_KEYS: `name:token`; a bare token is named DEFAULT_CALLER. Names are stored with idempotency
# keys and written to the access log, so they are short and plain.
DEFAULT_CALLER = "default"
_CALLER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# What a key may do, when API_KEYS gives it scopes: `name[scope+scope]:token`. A key without
# scopes may do everything (as every key could before scopes). Settling a payment by hand is no
# caller's business any more: payments settle from the gateway, and an operator's decision is an
# admin action (ADMIN_API_KEYS); the scope that allowed it is refused with a line saying so.
SCOPES = ("payments:read", "payments:write", "refunds:write")
REMOVED_SCOPES = {
    "payments:settle": (
        "settling a payment is an admin action now (ADMIN_API_KEYS, POST "
        "/admin/payments/{id}/settlement): remove the scope"
    ),
}
# A name cannot hold '[' or ':', so the first '[' before any ':' opens the scopes; the token is
# everything after "]:" (it may hold ':', '[' and ']' itself).
_SCOPED_ENTRY = re.compile(r"(?P<name>[^:\[]*)\[(?P<scopes>[^\]]*)\]:(?P<token>.*)", re.DOTALL)


@dataclass(frozen=True)
class ApiKey:
    """One `API_KEYS` entry: the caller's name (its idempotency scope), its bearer token, and
    what it may do (`scopes`; None: everything)."""

    name: str
    token: str = field(repr=False)
    scopes: frozenset[str] | None = None


def _scopes(number: int, listed: str) -> frozenset[str]:
    scopes = [part.strip() for part in listed.split("+")]
    if not any(scopes):
        raise ValueError(
            f"entry {number} lists no scope (leave out the brackets for a key that may do "
            "everything)"
        )
    for position, scope in enumerate(scopes, start=1):
        if scope in REMOVED_SCOPES:
            raise ValueError(f"entry {number}: scope {scope} is gone: {REMOVED_SCOPES[scope]}")
        if scope not in SCOPES:
            raise ValueError(
                f"entry {number}: scope {position} is not one of {', '.join(SCOPES)} "
                "(name[scope+scope]:token)"
            )
    return frozenset(scopes)


def parse_api_keys(entries: tuple[str, ...], *, scoped: bool = True) -> tuple[ApiKey, ...]:
    """`name:token` or (when `scoped`) `name[scope+scope]:token` entries (a bare token is named
    `default`), refused when ambiguous.

    Several bare tokens share `default`: that is what they meant before names existed (one shared
    scope). Otherwise a name is given once and a token once. Messages name entries by position and
    never quote one: a mistyped entry may be a token.
    """
    keys: list[ApiKey] = []
    names: dict[str, tuple[int, bool]] = {}  # name -> (its first entry, given as a bare token)
    tokens: dict[str, int] = {}
    for number, entry in enumerate(entries, start=1):
        scopes: frozenset[str] | None = None
        if with_scopes := _SCOPED_ENTRY.fullmatch(entry):
            if not scoped:
                raise ValueError(f"entry {number}: these keys take no scopes (use name:token)")
            name, token = with_scopes["name"].strip(), with_scopes["token"].strip()
            bare = False
            scopes = _scopes(number, with_scopes["scopes"])
        else:
            name, colon, token = (part.strip() for part in entry.partition(":"))
            bare = not colon
            if bare:
                name, token = DEFAULT_CALLER, name
            elif "[" in name:
                raise ValueError(f"entry {number}: scopes are written name[scope+scope]:token")
        if not name:
            raise ValueError(f"entry {number} has an empty name (use name:token)")
        if not _CALLER_NAME.match(name):
            raise ValueError(
                f"entry {number}: a name is 1-64 letters, digits, '.', '_' or '-' (use name:token)"
            )
        if not token:
            raise ValueError(f"entry {number} has an empty token")
        first, first_bare = names.setdefault(name, (number, bare))
        if first != number and not (bare and first_bare):
            raise ValueError(f"entries {first} and {number} have the same name")
        if (first := tokens.setdefault(token, number)) != number:
            raise ValueError(f"entries {first} and {number} have the same token")
        keys.append(ApiKey(name, token, scopes))
    return tuple(keys)


# What production accepts as an admin token (ADMIN_API_KEYS): long, varied and not a short piece
# repeated, so that a placeholder or a guessable word cannot open the admin API. A generated
# token passes: `python -c "import secrets; print(secrets.token_urlsafe(32))"`.
ADMIN_TOKEN_MIN_LENGTH = 32  # characters
ADMIN_TOKEN_MIN_DISTINCT = 10  # different characters (a random 32-hex token has about 14)
ADMIN_TOKEN_RULE = (
    f"at least {ADMIN_TOKEN_MIN_LENGTH} characters, at least {ADMIN_TOKEN_MIN_DISTINCT} of them "
    "different, and not one shorter piece repeated"
)


def strong_admin_token(token: str) -> bool:
    """Whether `token` follows ADMIN_TOKEN_RULE."""
    repeated = token in (token + token)[1:-1]  # s is a piece repeated iff it is found in s+s inside
    return (
        len(token) >= ADMIN_TOKEN_MIN_LENGTH
        and len(set(token)) >= ADMIN_TOKEN_MIN_DISTINCT
        and not repeated
    )


def admin_key_problem(
    admin_keys: tuple[ApiKey, ...], api_keys: tuple[ApiKey, ...], *, production: bool
) -> str | None:
    """What is wrong with ADMIN_API_KEYS, in one line that names entries by position and never
    quotes a token; None when nothing is.

    An admin token that is also a caller's token (API_KEYS) is refused in every environment: it
    would make that caller an admin, whose endpoints changes redirect every callback, and no
    setting wants it, so a configuration that starts in development starts in production too.
    Production also refuses weak admin tokens (ADMIN_TOKEN_RULE).
    """
    callers = {key.token: number for number, key in enumerate(api_keys, start=1)}
    for number, key in enumerate(admin_keys, start=1):
        if key.token in callers:
            return (
                f"ADMIN_API_KEYS: entry {number}'s token is also API_KEYS entry "
                f"{callers[key.token]}'s; give admins tokens of their own"
            )
        if production and not strong_admin_token(key.token):
            return (
                f"ADMIN_API_KEYS: entry {number}'s token is too weak for ENVIRONMENT=production: "
                f"use {ADMIN_TOKEN_RULE} (e.g. python -c "
                "'import secrets; print(secrets.token_urlsafe(32))')"
            )
    return None


class ConfigurationError(Exception):
    """The configuration is invalid; the message names the variable."""


# The services whose callback endpoint the settings describe (seeded as an endpoint of that name
# by payment_service.endpoints.seed_from_settings): `notification` always, the others when their
# *_CALLBACK_PATH is set.
SEEDED_SERVICES = ("notification", "trip", "driver", "rider")


class SeededURL(NamedTuple):
    """A service's callback URL as the settings describe it, and the variables it comes from."""

    service: str
    url: str
    source: str  # e.g. "TRIP_SERVICE_URL + TRIP_CALLBACK_PATH"


class Settings(BaseSettings):
    """Every setting of the API, the relay and the commands.

    Field names are the environment variables, case-insensitively. `DATABASE_URL` wins over the
    `DB_*` parts; with neither, only `payment-service run` works (it starts an embedded database).
    """

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: str | None = None
    db_host: str | None = None
    db_port: int = Field(default=5432, ge=1, le=65535)
    db_name: str = "postgres"
    db_user: str = "postgres"
    db_pass: str | None = Field(default=None, repr=False)
    db_pool_min: int = Field(default=2, ge=0, le=1000)
    db_pool_max: int = Field(default=10, ge=1, le=1000)

    service_port: int = Field(default=8082, ge=1, le=65535)
    api_prefix: str = ""
    idempotency_key_ttl: int = Field(default=86400, ge=1)

    trip_service_url: AnyHttpUrl = AnyHttpUrl("http://localhost:8081")
    driver_service_url: AnyHttpUrl = AnyHttpUrl("http://localhost:8083")
    rider_service_url: AnyHttpUrl = AnyHttpUrl("http://localhost:8084")
    notification_service_url: AnyHttpUrl = AnyHttpUrl("http://localhost:8085")
    notification_callback_path: str = "/notifications"
    # A service whose *_CALLBACK_PATH is set is seeded as endpoint trip / driver / rider,
    # subscribed to its *_EVENT_TYPES (comma-separated; default every type).
    trip_callback_path: str | None = None
    driver_callback_path: str | None = None
    rider_callback_path: str | None = None
    trip_event_types: Annotated[tuple[str, ...], NoDecode] = ("*",)
    driver_event_types: Annotated[tuple[str, ...], NoDecode] = ("*",)
    rider_event_types: Annotated[tuple[str, ...], NoDecode] = ("*",)
    callback_signing_secret: str | None = Field(default=None, repr=False)
    # Networks callbacks may reach although they are loopback (in production), link-local,
    # unspecified or multicast: comma-separated CIDRs (payment_service.callback_urls).
    endpoint_allowed_networks: Annotated[tuple[Network, ...], NoDecode] = ()

    api_keys: Annotated[tuple[ApiKey, ...], NoDecode] = Field(default=(), repr=False)
    # `name:token` pairs for /admin/…; empty: the admin API answers 404.
    admin_api_keys: Annotated[tuple[ApiKey, ...], NoDecode] = Field(default=(), repr=False)
    async_methods: Annotated[tuple[str, ...], NoDecode] = ()
    default_currency: str = "INR"
    max_payment_amount: Decimal = Field(
        default=Decimal("1000000.00"), gt=0, le=Decimal("9999999999.99")
    )

    environment: Literal["development", "test", "staging", "production"] = "development"
    debug: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    relay_batch_size: int = Field(default=100, ge=1, le=10000)
    relay_concurrency: int = Field(default=32, ge=1, le=1000)
    relay_lease_seconds: float = Field(default=30, gt=0)
    relay_max_attempts: int = Field(default=12, ge=1, le=100)
    relay_poll_interval: float = Field(default=1.0, gt=0)
    relay_request_timeout: float = Field(default=10, gt=0)
    relay_metrics_port: int = Field(default=9102, ge=0, le=65535)  # 0: no metrics endpoint
    # Loopback unless configured: the metrics are unauthenticated. Compose sets 0.0.0.0 so that
    # its network (not the host) can scrape the relay container.
    relay_metrics_host: str = "127.0.0.1"
    outbox_retention_hours: float = Field(default=168, ge=0)
    # Relay tuning (tests and demos shorten these). RELAY_RETRY_SCHEDULE: seconds before attempt
    # 2, 3, … (comma-separated; the last repeats). RELAY_QUICK_RETRIES: extra tries inside one
    # attempt, RELAY_QUICK_RETRY_WAIT seconds apart at first (exponential, jittered).
    relay_retry_schedule: Annotated[tuple[Annotated[float, Field(gt=0)], ...], NoDecode] = Field(
        default=(5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400), min_length=1
    )
    relay_quick_retries: int = Field(default=2, ge=0, le=10)
    relay_quick_retry_wait: float = Field(default=0.2, ge=0, le=60)
    relay_shutdown_grace_seconds: float = Field(default=10, ge=0)  # drain time on SIGTERM
    relay_housekeeping_interval: float = Field(default=300, gt=0)  # seconds between passes

    # Endpoint health: the breaker opens after this many consecutive failed
    # attempts, probes after the cooldown (doubling up to 10 minutes); an endpoint failing
    # without a success for ENDPOINT_DISABLE_AFTER_HOURS is DISABLED.
    endpoint_breaker_failures: int = Field(default=10, ge=1, le=10000)
    endpoint_breaker_cooldown_seconds: float = Field(default=30, gt=0, le=600)
    endpoint_disable_after_hours: float = Field(default=120, gt=0)

    payment_service_data_dir: Path = Path(".data")

    # The payment gateway (docs/gateway.md). `none`: nothing is charged anywhere, payments are
    # recorded as the request says. STRIPE_API_FLAVOUR=localstripe: the embedded gateway, which
    # speaks a subset of Stripe's API (no off_session on a confirm, no created filter on lists).
    gateway: Literal["stripe", "none"] = "stripe"
    stripe_secret_key: SecretStr | None = Field(default=None, repr=False)
    stripe_api_base: str = "https://api.stripe.com"
    stripe_webhook_secret: SecretStr | None = Field(default=None, repr=False)
    stripe_api_flavour: Literal["stripe", "localstripe"] = "stripe"
    gateway_methods: Annotated[tuple[str, ...], NoDecode] = GATEWAY_METHODS
    gateway_timeout_seconds: float = Field(default=10, gt=0, le=120)
    # Used when a request names no payment method, only with a test key or the embedded gateway.
    gateway_test_payment_method: str = Field(default="pm_card_visa", min_length=1)
    # Checks of an unknown outcome before the payment is flagged for review (never failed).
    gateway_max_checks: int = Field(default=12, ge=1, le=1000)
    # Seconds before the gateway worker first asks about an undecided charge or refund; the wait
    # doubles with each check, up to an hour.
    gateway_check_interval: float = Field(default=5, gt=0, le=3600)
    # Seconds between the relay's scheduled reconciliations with the gateway (one relay runs each;
    # docs/gateway.md); 0 turns them off.
    gateway_reconcile_interval: float = Field(default=3600, ge=0, le=7 * 86400)
    # Days the gateway's webhooks are kept (gateway_events: stored once by event id) before the
    # relay's housekeeping deletes them; a repeat older than this would be applied again, which
    # changes nothing (forward-only).
    gateway_events_retention_days: float = Field(default=30, gt=0, le=3650)

    @field_validator("db_host")
    @classmethod
    def _hosts(cls, value: str | None) -> str | None:
        if value is not None and "," in value:
            hosts = [host.strip() for host in value.split(",")]
            if not all(hosts):
                raise ValueError("an empty host name in the list (use host1,host2)")
            if any(":" in host or "/" in host for host in hosts):
                raise ValueError("host names only (every host uses DB_PORT)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator(
        "api_keys",
        "admin_api_keys",
        "async_methods",
        "relay_retry_schedule",
        "trip_event_types",
        "driver_event_types",
        "rider_event_types",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @classmethod
    def _parsed_csv(cls, value: object, parse: Callable[[tuple[str, ...]], object]) -> object:
        # Before-validators run last-defined first: split here too, whatever the order.
        value = cls._split_csv(value)
        if isinstance(value, tuple | list) and all(isinstance(entry, str) for entry in value):
            return parse(tuple(value))
        return value

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _api_keys(cls, value: object, info: ValidationInfo) -> object:
        # An admin key may do every admin thing: scopes there would only mislead.
        scoped = info.field_name == "api_keys"
        return cls._parsed_csv(value, lambda entries: parse_api_keys(entries, scoped=scoped))

    @field_validator("async_methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        methods = tuple(method.upper() for method in value)
        unknown = sorted(set(methods) - set(PAYMENT_METHODS))
        if unknown:
            raise ValueError(f"unknown payment method(s) {unknown}; use {list(PAYMENT_METHODS)}")
        return methods

    @field_validator("endpoint_allowed_networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        return cls._parsed_csv(value, parse_networks)

    @field_validator("default_currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        if not _CURRENCY.match(value):
            raise ValueError("must be three upper-case letters (ISO 4217)")
        return value

    @field_validator("api_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
            raise ValueError("must look like /v1 (a path starting with '/')")
        return value

    @field_validator(
        "notification_callback_path",
        "trip_callback_path",
        "driver_callback_path",
        "rider_callback_path",
    )
    @classmethod
    def _callback_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("trip_event_types", "driver_event_types", "rider_event_types")
    @classmethod
    def _event_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return event_type_patterns(value)

    @field_validator("callback_signing_secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith("whsec_"):
            raise ValueError("must be 'whsec_' followed by base64 (Standard Webhooks format)")
        try:
            key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
        except ValueError:
            raise ValueError("the part after 'whsec_' is not valid base64") from None
        if len(key) < 24:
            raise ValueError("the key must be at least 24 random bytes")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("DB_POOL_MIN must not exceed DB_POOL_MAX")
        problem = admin_key_problem(
            self.admin_api_keys, self.api_keys, production=self.environment == "production"
        )
        if problem:
            raise ValueError(problem)
        if self.environment == "production":
            if not self.api_keys:
                raise ValueError("API_KEYS must be set when ENVIRONMENT=production")
            if not self.callback_signing_secret:
                raise ValueError("CALLBACK_SIGNING_SECRET must be set when ENVIRONMENT=production")
        return self

    @field_validator("gateway_methods", mode="before")
    @classmethod
    def _gateway_methods_csv(cls, value: object) -> object:
        return cls._split_csv(value)

    @field_validator("gateway_methods")
    @classmethod
    def _gateway_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        methods = cls._known_methods(value)
        if "CASH" in methods:
            raise ValueError("CASH is paid to the driver: it is never charged at a gateway")
        return methods

    @field_validator("stripe_secret_key", "stripe_webhook_secret", mode="before")
    @classmethod
    def _unset_if_empty(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("stripe_api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not re.fullmatch(r"https?://[^/\s?#]+", value):
            raise ValueError("must be a scheme and a host, such as https://api.stripe.com")
        return value

    @model_validator(mode="after")
    def _live_key_pairing(self) -> Settings:
        # Each STRIPE_* setting has a default of its own (the embedded gateway's, in compose): a
        # live key set without the others would travel in clear to the fake, or real Stripe be
        # spoken to as if it were the fake. Named, never quoted: the message must not carry the key.
        key = self.stripe_secret_key.get_secret_value() if self.stripe_secret_key else ""
        if self.gateway != "stripe" or not key.startswith(STRIPE_LIVE_KEY_PREFIXES):
            return self
        if self.stripe_api_flavour == "localstripe":
            raise ValueError(
                "STRIPE_API_FLAVOUR=localstripe with a live STRIPE_SECRET_KEY: set "
                "STRIPE_API_FLAVOUR=stripe and STRIPE_API_BASE=https://api.stripe.com"
            )
        if not self.stripe_api_base.startswith("https://"):
            raise ValueError(
                "STRIPE_API_BASE is plain http:// with a live STRIPE_SECRET_KEY (the key would "
                "travel unencrypted): use https://api.stripe.com"
            )
        return self

    @model_validator(mode="after")
    def _gateway_in_production(self) -> Settings:
        if self.environment != "production" or self.gateway != "stripe":
            return self
        key = self.stripe_secret_key.get_secret_value() if self.stripe_secret_key else ""
        if not key:
            raise ValueError("STRIPE_SECRET_KEY must be set when ENVIRONMENT=production")
        if key.startswith(STRIPE_TEST_KEY_PREFIXES):
            # Named, never quoted: the message must not carry the key.
            raise ValueError(
                "STRIPE_SECRET_KEY is a test key; ENVIRONMENT=production needs a live one"
            )
        if not self.stripe_webhook_secret:
            raise ValueError("STRIPE_WEBHOOK_SECRET must be set when ENVIRONMENT=production")
        if self.stripe_api_flavour != "stripe":
            raise ValueError("STRIPE_API_FLAVOUR must be stripe when ENVIRONMENT=production")
        if not self.stripe_api_base.startswith("https://"):
            # The key travels in every request's headers.
            raise ValueError(
                "STRIPE_API_BASE must be an https:// address when ENVIRONMENT=production"
            )
        return self

    @model_validator(mode="after")
    def _seeded_urls_pass_the_endpoint_check(self) -> Settings:
        # A URL the endpoint check refuses would be seeded anyway, and then disabled by the relay
        # (a URL it cannot send to) or refused at every delivery (an address callbacks may not
        # reach): refused here instead, before anything starts.
        for seeded in self.seeded_urls():
            try:
                check_callback_url(seeded.url, self.callback_networks)
            except CallbackURLRefused as refused:
                variable = f"{seeded.service.upper()}_SERVICE_URL"
                where = " in production" if refused.kind == LOOPBACK else ""
                raise ValueError(
                    f"{seeded.source}: {refused.where} is {refused.kind}, where callbacks may not "
                    f"go{where}: set {variable} to an address they may reach, or list its network "
                    "in ENDPOINT_ALLOWED_NETWORKS"
                ) from None
            except CallbackURLError as error:
                raise ValueError(f"{seeded.source}: {error}") from None
        return self

    @property
    def has_database(self) -> bool:
        return bool(self.database_url or self.db_host)

    def dsn(self) -> str:
        """The database address: `DATABASE_URL`, else one built from the `DB_*` parts."""
        if self.database_url:
            return self.database_url
        if not self.db_host:
            raise ConfigurationError(
                "DATABASE_URL (or DB_HOST and friends) is not set; set it, or use "
                "'payment-service run', which starts an embedded PostgreSQL"
            )
        auth = quote(self.db_user, safe="")
        if self.db_pass:
            auth += ":" + quote(self.db_pass, safe="")
        # `DB_HOST=pg1,pg2` (a primary and its standbys, in any order): every host on DB_PORT, and
        # libpq's rule for choosing among them, so each connection finds whichever is the primary.
        hosts = [host.strip() for host in self.db_host.split(",")]
        where = ",".join(f"{host}:{self.db_port}" for host in hosts)
        options = "?target_session_attrs=read-write" if len(hosts) > 1 else ""
        return f"postgresql://{auth}@{where}/{quote(self.db_name, safe='')}{options}"

    @property
    def callback_networks(self) -> NetworkPolicy:
        """Where callbacks may go: loopback only outside production, plus the listed networks."""
        return network_policy(
            production=self.environment == "production", allowed=self.endpoint_allowed_networks
        )

    @property
    def notification_url(self) -> str:
        return self.seeded_urls()[0].url

    def seeded_urls(self) -> list[SeededURL]:
        """The callback URL of each service in SEEDED_SERVICES the settings describe, in order
        (`notification` first): *_SERVICE_URL without its trailing '/', then *_CALLBACK_PATH."""
        seeded = []
        for service in SEEDED_SERVICES:
            path: str | None = getattr(self, f"{service}_callback_path")
            if path is not None:
                base = str(getattr(self, f"{service}_service_url")).rstrip("/")
                upper = service.upper()
                source = f"{upper}_SERVICE_URL + {upper}_CALLBACK_PATH"
                seeded.append(SeededURL(service, base + path, source))
        return seeded


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning a validation error into one line that names the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        first = error.errors()[0]
        loc = "_".join(str(part) for part in first["loc"]).upper()
        message = first["msg"].removeprefix("Value error, ")
        where = f"{loc}: " if loc else ""
        raise ConfigurationError(f"invalid configuration: {where}{message}") from None
