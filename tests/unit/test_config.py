"""Configuration: defaults, environment variables and `.env`, DATABASE_URL over DB_*,
and bad configuration refused with one line naming the variable."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from payment_service.config import ApiKey, ConfigurationError, Settings, load_settings

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
# Where production's notification service is: a platform service's private address (production
# refuses the default, a loopback one); nothing here sends to it.
NOTIFICATION_SERVICE_URL = "http://10.0.0.5:8085"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No setting leaks in from the developer's shell or a .env in the checkout."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield


def refused(**overrides: object) -> str:
    with pytest.raises(ConfigurationError) as info:
        load_settings(**overrides)
    message = str(info.value)
    assert "\n" not in message, "one line"
    return message


def test_defaults() -> None:
    settings = load_settings()
    assert settings.service_port == 8082
    assert settings.api_prefix == ""
    assert settings.relay_metrics_host == "127.0.0.1", "unauthenticated metrics stay local"
    assert settings.idempotency_key_ttl == 86400
    assert settings.db_pool_min == 2 and settings.db_pool_max == 10
    assert settings.api_keys == ()
    assert settings.async_methods == ()
    assert settings.default_currency == "INR"
    assert settings.max_payment_amount == Decimal("1000000.00")
    assert settings.environment == "development"
    assert settings.debug is False
    assert settings.log_level == "INFO"
    assert settings.callback_signing_secret is None
    assert settings.notification_url == "http://localhost:8085/notifications"
    assert (settings.relay_batch_size, settings.relay_concurrency, settings.relay_max_attempts) == (
        100, 32, 12,
    )  # fmt: skip
    assert settings.relay_lease_seconds == 30
    assert settings.relay_poll_interval == 1.0
    assert settings.relay_request_timeout == 10
    assert settings.outbox_retention_hours == 168
    assert settings.has_database is False


def test_no_database_is_a_clear_error() -> None:
    settings = load_settings()
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        settings.dsn()


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVICE_PORT", "9000")
    monkeypatch.setenv("API_KEYS", " k1, k2 ,,k3 ")
    monkeypatch.setenv("ASYNC_METHODS", "upi,WALLET")
    monkeypatch.setenv("API_PREFIX", "/v1/")
    monkeypatch.setenv("IDEMPOTENCY_KEY_TTL", "60")
    monkeypatch.setenv("MAX_PAYMENT_AMOUNT", "500.50")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = load_settings()
    assert settings.service_port == 9000
    assert settings.api_keys == (
        ApiKey("default", "k1"),
        ApiKey("default", "k2"),
        ApiKey("default", "k3"),
    )
    assert settings.async_methods == ("UPI", "WALLET")
    assert settings.api_prefix == "/v1"
    assert settings.idempotency_key_ttl == 60
    assert settings.max_payment_amount == Decimal("500.50")
    assert settings.log_level == "DEBUG"


def test_dotenv_is_read_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("SERVICE_PORT=9100\nDEFAULT_CURRENCY=EUR\n")
    monkeypatch.setenv("SERVICE_PORT", "9200")
    settings = load_settings()
    assert settings.default_currency == "EUR"
    assert settings.service_port == 9200


def test_database_url_wins_over_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_HOST", "db.example")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@url-host:5433/payments")
    assert load_settings().dsn() == "postgresql://u@url-host:5433/payments"


def test_dsn_from_parts_quotes_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_HOST", "db")
    monkeypatch.setenv("DB_PORT", "5433")
    monkeypatch.setenv("DB_NAME", "postgres")
    monkeypatch.setenv("DB_USER", "postgres")
    monkeypatch.setenv("DB_PASS", "Superb#915")  # the seed guide's example password
    settings = load_settings()
    assert settings.has_database
    assert settings.dsn() == "postgresql://postgres:Superb%23915@db:5433/postgres"


def test_db_host_lists_a_primary_and_its_standbys(monkeypatch: pytest.MonkeyPatch) -> None:
    """`DB_HOST=db,db-standby` (compose's failover demo): both hosts on DB_PORT, and only the
    one accepting writes is used."""
    monkeypatch.setenv("DB_HOST", " db , db-standby")
    monkeypatch.setenv("DB_PORT", "5432")
    monkeypatch.setenv("DB_PASS", "Superb#915")
    settings = load_settings()
    assert settings.dsn() == (
        "postgresql://postgres:Superb%23915@db:5432,db-standby:5432/postgres"
        "?target_session_attrs=read-write"
    )
    assert "Superb" not in repr(settings)


@pytest.mark.parametrize("hosts", ["db,", "db,,db-standby", "db,db-standby:5433"])
def test_db_host_list_refuses_empty_names_and_ports(
    monkeypatch: pytest.MonkeyPatch, hosts: str
) -> None:
    monkeypatch.setenv("DB_HOST", hosts)
    monkeypatch.setenv("DB_PASS", "Superb#915")
    message = refused()
    assert message.startswith("invalid configuration: DB_HOST: "), message
    assert "Superb" not in message


@pytest.mark.parametrize(
    ("environment", "variable"),
    [
        ({"ENVIRONMENT": "production", "CALLBACK_SIGNING_SECRET": SECRET}, "API_KEYS"),
        ({"ENVIRONMENT": "production", "API_KEYS": "k1"}, "CALLBACK_SIGNING_SECRET"),
        ({"ENVIRONMENT": "production"}, "API_KEYS"),
    ],
)
def test_production_requires_keys_and_secret(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], variable: str
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert variable in refused()


def test_production_with_keys_and_secret_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("GATEWAY", "none")  # a gateway's own secrets: test_config_gateway.py
    monkeypatch.setenv("API_KEYS", "k1")
    monkeypatch.setenv("CALLBACK_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("NOTIFICATION_SERVICE_URL", NOTIFICATION_SERVICE_URL)
    settings = load_settings()
    assert settings.environment == "production"
    assert settings.callback_signing_secret == SECRET


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SERVICE_PORT", "0"),
        ("SERVICE_PORT", "70000"),
        ("SERVICE_PORT", "http"),
        ("DB_PORT", "-1"),
        ("IDEMPOTENCY_KEY_TTL", "0"),
        ("ASYNC_METHODS", "UPI,BITCOIN"),
        ("DEFAULT_CURRENCY", "inr"),
        ("DEFAULT_CURRENCY", "RUPEE"),
        ("API_PREFIX", "v1"),
        ("API_PREFIX", "/v1?x"),
        ("MAX_PAYMENT_AMOUNT", "0"),
        ("MAX_PAYMENT_AMOUNT", "abc"),
        ("ENVIRONMENT", "prod"),
        ("LOG_LEVEL", "LOUD"),
        ("NOTIFICATION_SERVICE_URL", "not a url"),
        ("TRIP_SERVICE_URL", "ftp://trips"),
        ("NOTIFICATION_CALLBACK_PATH", "notifications"),
        ("CALLBACK_SIGNING_SECRET", "plain-secret"),
        ("CALLBACK_SIGNING_SECRET", "whsec_!!!not-base64!!!"),
        ("CALLBACK_SIGNING_SECRET", "whsec_" + base64.b64encode(b"short").decode()),
        ("RELAY_BATCH_SIZE", "0"),
        ("RELAY_POLL_INTERVAL", "0"),
        ("DB_POOL_MAX", "0"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    message = refused()
    assert variable in message, message
    assert message.startswith("invalid configuration"), message


def test_api_keys_name_their_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "svc-a:tok1, svc-b:tok2,baretok")
    assert load_settings().api_keys == (
        ApiKey("svc-a", "tok1"),
        ApiKey("svc-b", "tok2"),
        ApiKey("default", "baretok"),  # a bare token is the caller `default`, as before names
    )


def test_a_token_may_contain_colons_after_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "svc.a_1:abc:def")
    assert load_settings().api_keys == (ApiKey("svc.a_1", "abc:def"),)


def test_keys_may_be_given_scopes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "API_KEYS",
        "trip[payments:write+payments:read]:tok1, support[ refunds:write + payments:read ]:tok2,"
        "reader:tok3,rider[payments:read]:a:b]:c[d",
    )
    assert load_settings().api_keys == (
        ApiKey("trip", "tok1", frozenset({"payments:write", "payments:read"})),
        ApiKey("support", "tok2", frozenset({"refunds:write", "payments:read"})),
        ApiKey("reader", "tok3"),  # no scopes: everything, as before scopes
        ApiKey("rider", "a:b]:c[d", frozenset({"payments:read"})),  # the token after "]:"
    )


def test_the_settle_scope_is_refused_with_where_settlement_went(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Settling a payment by hand became an admin action: a key still given the old scope
    stops the start with a line that says so, rather than silently granting nothing."""
    monkeypatch.setenv("API_KEYS", "trip[payments:write]:tok1,gateway[payments:settle]:tok2")
    message = refused()
    assert message.startswith(
        "invalid configuration: API_KEYS: entry 2: scope payments:settle is gone: settling a "
        "payment is an admin action now (ADMIN_API_KEYS"
    ), message
    assert "tok2" not in message


def test_admin_keys_take_no_scopes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_API_KEYS", "ops[payments:read]:admin-tok1")
    message = refused()
    assert message == (
        "invalid configuration: ADMIN_API_KEYS: entry 1: these keys take no scopes (use name:token)"
    )


def test_scopes_never_change_what_an_entry_without_brackets_means(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name holds no '[' or ':', so only `name[…]:token` has scopes: a token with brackets
    or colons after a plain name, or a bare token with brackets, means what it meant."""
    monkeypatch.setenv("API_KEYS", "svc:tok[payments:read]:x,[refunds]tok")
    assert load_settings().api_keys == (
        ApiKey("svc", "tok[payments:read]:x"),
        ApiKey("default", "[refunds]tok"),
    )


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (":tok1", "entry 1 has an empty name"),
        ("svc-a:", "entry 1 has an empty token"),
        ("svc-a:tok1,svc b:tok2", "entry 2: a name is"),
        ("svc-a:tok1,svc/b:tok2", "entry 2: a name is"),
        ("-svc:tok1", "entry 1: a name is"),
        ("svc-a:tok1,svc-a:tok2", "entries 1 and 2 have the same name"),
        ("baretok,default:tok2", "entries 1 and 2 have the same name"),
        ("default:tok1,baretok", "entries 1 and 2 have the same name"),
        ("svc-a:tok1,svc-b:tok1", "entries 1 and 2 have the same token"),
        ("tok1,svc-b:tok2,tok1", "entries 1 and 3 have the same token"),
        ("svc-a[]:tok1", "entry 1 lists no scope"),
        ("svc-a[ + ]:tok1", "entry 1 lists no scope"),
        ("svc-a[payments:read+payments:delete]:tok1", "entry 1: scope 2 is not one of"),
        ("svc-a[payments:read+]:tok1", "entry 1: scope 2 is not one of"),
        ("svc-a[tok2]:tok1", "entry 1: scope 1 is not one of"),
        ("svc-a[payments:read:tok1", "entry 1: scopes are written name[scope+scope]:token"),
        ("[payments:read]:tok1", "entry 1 has an empty name"),
        ("svc-a[payments:read]:", "entry 1 has an empty token"),
        ("svc-a[payments:read]:tok1,svc-a:tok2", "entries 1 and 2 have the same name"),
    ],
)
def test_malformed_api_keys_are_refused_without_quoting_a_token(
    monkeypatch: pytest.MonkeyPatch, value: str, complaint: str
) -> None:
    monkeypatch.setenv("API_KEYS", value)
    message = refused()
    assert message.startswith("invalid configuration: API_KEYS: "), message
    assert complaint in message, message
    assert "tok1" not in message and "tok2" not in message, message


def test_several_bare_tokens_share_the_default_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """Today's `API_KEYS=k1,k2` keeps working: both are the one caller it always was."""
    monkeypatch.setenv("API_KEYS", "k1,k2,svc-a:k3")
    assert [key.name for key in load_settings().api_keys] == ["default", "default", "svc-a"]


def test_pool_min_above_max_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_POOL_MIN", "20")
    monkeypatch.setenv("DB_POOL_MAX", "10")
    assert "DB_POOL_MIN" in refused()


def test_secrets_are_not_in_the_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "super-secret-key,svc-a:named-secret-key")
    monkeypatch.setenv("CALLBACK_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("DB_PASS", "db-password-123")
    settings = load_settings()
    text = repr(settings) + str(settings) + repr(settings.api_keys)
    for secret in ("super-secret-key", "named-secret-key", SECRET, "db-password-123"):
        assert secret not in text


def test_secret_values_are_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBACK_SIGNING_SECRET", "whsec_tooshortbutsecret")
    message = refused()
    assert "tooshortbutsecret" not in message


def test_keyword_overrides_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "from-env")
    settings = load_settings(api_keys=("k1",), async_methods=("UPI",), api_prefix="/v1")
    assert settings.api_keys == (ApiKey("default", "k1"),)
    assert settings.async_methods == ("UPI",)
    assert settings.api_prefix == "/v1"


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        settings.service_port = 1


def test_run_without_the_embedded_extra_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pgserver is an extra: without it, one clear line names the extra and DATABASE_URL."""
    import sys

    from payment_service import embedded

    monkeypatch.setitem(sys.modules, "pgserver._commands", None)  # import raises ImportError
    with pytest.raises(ConfigurationError, match=r"'embedded' extra.*DATABASE_URL"):
        embedded._bin_dir()


STRONG_ADMIN_TOKEN = "Zq3vR8xK1mWb7tYc0pLf5nHd2sGj9uAe"  # 32 characters, all different


def production(monkeypatch: pytest.MonkeyPatch, **variables: str) -> None:
    """ENVIRONMENT=production with what it needs besides `variables`; no payment gateway (its own
    production rules are tested in test_config_gateway.py)."""
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("GATEWAY", "none")
    monkeypatch.setenv("API_KEYS", "svc-a:caller-token-0123456789abcdefghijkl")
    monkeypatch.setenv("CALLBACK_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY", "none")  # the gateway's own production rules: test_config_gateway
    monkeypatch.setenv("NOTIFICATION_SERVICE_URL", NOTIFICATION_SERVICE_URL)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    "token",
    [
        "changeme",  # short
        "admin-admin-admin-admin-admin-admin",  # long, but one piece repeated
        "password1234password1234password1234",  # repeated, 11 different characters
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",  # repeated, one character
        "abcabcabcabcabcabcabcabcabcabcabcabcXYZ",  # not a repetition, 6 different characters
        STRONG_ADMIN_TOKEN[:31],  # one character short
    ],
)
def test_production_refuses_a_weak_admin_token_without_quoting_it(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    production(monkeypatch, ADMIN_API_KEYS=f"ops:{STRONG_ADMIN_TOKEN},backup:{token}")
    message = refused()
    assert message.startswith("invalid configuration: ADMIN_API_KEYS: entry 2's token"), message
    assert "at least 32 characters" in message, message
    assert token not in message and STRONG_ADMIN_TOKEN not in message


@pytest.mark.parametrize(
    "token",
    [STRONG_ADMIN_TOKEN, "0123456789abcdef0123456789abcdeF", "9f86d081884c7d659a2feaa0c55ad015"],
)
def test_production_accepts_a_strong_admin_token(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    production(monkeypatch, ADMIN_API_KEYS=f"ops:{token}")
    assert [key.name for key in load_settings().admin_api_keys] == ["ops"]


def test_outside_production_a_short_admin_token_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENVIRONMENT", "staging")
    monkeypatch.setenv("ADMIN_API_KEYS", "ops:dev")
    assert load_settings().admin_api_keys == (ApiKey("ops", "dev"),)


@pytest.mark.parametrize("environment", ["development", "test", "staging", "production"])
def test_a_token_in_both_key_lists_is_refused_in_every_environment(
    monkeypatch: pytest.MonkeyPatch, environment: str
) -> None:
    production(
        monkeypatch,
        ENVIRONMENT=environment,
        API_KEYS=f"svc-a:caller-token-0123456789abcdefghijkl,svc-b:{STRONG_ADMIN_TOKEN}",
        ADMIN_API_KEYS=f"ops:{STRONG_ADMIN_TOKEN}",
    )
    message = refused()
    assert message == (
        "invalid configuration: ADMIN_API_KEYS: entry 1's token is also API_KEYS entry 2's; "
        "give admins tokens of their own"
    ), message


# -- the callback URLs the settings seed endpoints with -------------------------------------------
def test_production_refuses_the_default_loopback_notification_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default NOTIFICATION_SERVICE_URL (http://localhost:8085) would be seeded as endpoint
    `notification` and then refused at every delivery in production: it is refused at start-up,
    in one line naming the variables, unless ENDPOINT_ALLOWED_NETWORKS lists loopback."""
    production(monkeypatch)
    monkeypatch.delenv("NOTIFICATION_SERVICE_URL")
    assert refused() == (
        "invalid configuration: NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH: localhost "
        "is a loopback address, where callbacks may not go in production: set "
        "NOTIFICATION_SERVICE_URL to an address they may reach, or list its network in "
        "ENDPOINT_ALLOWED_NETWORKS"
    )
    for listed in ("127.0.0.0/8", "::1"):
        monkeypatch.setenv("ENDPOINT_ALLOWED_NETWORKS", listed)
        assert load_settings().notification_url == "http://localhost:8085/notifications"
    monkeypatch.delenv("ENDPOINT_ALLOWED_NETWORKS")
    monkeypatch.setenv("ENVIRONMENT", "staging")  # outside production, local receivers are fine
    assert load_settings().notification_url == "http://localhost:8085/notifications"


@pytest.mark.parametrize(
    ("service", "base"),
    [
        ("TRIP", "http://127.0.0.1:8081"),
        ("DRIVER", "http://[::1]:8083"),
        ("RIDER", "http://api.localhost:8084"),
        ("NOTIFICATION", "http://[::ffff:127.0.0.1]:8085"),
    ],
)
def test_production_refuses_any_seeded_loopback_url(
    monkeypatch: pytest.MonkeyPatch, service: str, base: str
) -> None:
    production(monkeypatch, **{f"{service}_SERVICE_URL": base, f"{service}_CALLBACK_PATH": "/cb"})
    message = refused()
    assert message.startswith(
        f"invalid configuration: {service}_SERVICE_URL + {service}_CALLBACK_PATH: "
    ), message
    assert "is a loopback address, where callbacks may not go in production: set " in message
    assert f"set {service}_SERVICE_URL to an address they may reach" in message


@pytest.mark.parametrize(
    ("variables", "source", "words"),
    [
        (
            {"NOTIFICATION_SERVICE_URL": "http://169.254.169.254"},
            "NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH",
            "169.254.169.254 is a link-local address, where callbacks may not go: set "
            "NOTIFICATION_SERVICE_URL to an address they may reach, or list its network in "
            "ENDPOINT_ALLOWED_NETWORKS",
        ),
        (
            {"TRIP_SERVICE_URL": "http://0.0.0.0:8081", "TRIP_CALLBACK_PATH": "/t"},
            "TRIP_SERVICE_URL + TRIP_CALLBACK_PATH",
            "0.0.0.0 is an unspecified address",
        ),
        (
            {"NOTIFICATION_CALLBACK_PATH": "/caf\u00e9"},
            "NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH",
            "the character 'é' in the path or query: percent-encode it (e.g. %C3%A9)",
        ),
        (
            {"NOTIFICATION_CALLBACK_PATH": "/n otifications"},
            "NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH",
            "a space: percent-encode it (%20)",
        ),
        (
            {"DRIVER_CALLBACK_PATH": "/d\x1b[2J"},
            "DRIVER_SERVICE_URL + DRIVER_CALLBACK_PATH",
            "a control character",
        ),
        (
            {"RIDER_CALLBACK_PATH": "/r#top"},
            "RIDER_SERVICE_URL + RIDER_CALLBACK_PATH",
            "a fragment (#…) is never sent",
        ),
        (
            {"TRIP_CALLBACK_PATH": "/" + "t" * 2000},
            "TRIP_SERVICE_URL + TRIP_CALLBACK_PATH",
            "longer than 2000 characters",
        ),
    ],
    ids=["link-local", "unspecified", "raw-path", "space", "control", "fragment", "length"],
)
def test_a_seeded_url_the_endpoint_check_refuses_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], source: str, words: str
) -> None:
    """In every environment: such a URL would be seeded, then disabled by the relay (it cannot
    send to it) or refused at each delivery. The line names the variables the URL comes from."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    message = refused()
    assert message.startswith(f"invalid configuration: {source}: "), message
    assert words in message, message


def test_a_password_in_a_seeded_url_is_refused_and_never_repeated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFICATION_SERVICE_URL", "http://ops:hunter2-canary@10.0.0.5:8085")
    message = refused()
    assert message == (
        "invalid configuration: NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH: "
        "credentials (user:password@) do not belong in it; receivers verify the callbacks' "
        "signatures instead"
    )
    assert "hunter2" not in message and "ops" not in message


def test_only_the_services_whose_callback_path_is_set_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TRIP_SERVICE_URL alone describes no endpoint (the trip service's other uses are not
    callbacks), so it is not held to the callbacks' rules; with TRIP_CALLBACK_PATH it is."""
    production(monkeypatch, TRIP_SERVICE_URL="http://127.0.0.1:8081")
    assert [seeded.service for seeded in load_settings().seeded_urls()] == ["notification"]
    monkeypatch.setenv("TRIP_CALLBACK_PATH", "/trips/payment-events")
    assert "TRIP_SERVICE_URL + TRIP_CALLBACK_PATH" in refused()
    monkeypatch.setenv("TRIP_SERVICE_URL", "http://trips.internal:8081/")
    assert [(s.service, s.url, s.source) for s in load_settings().seeded_urls()] == [
        ("notification", "http://10.0.0.5:8085/notifications", "NOTIFICATION_SERVICE_URL + "
         "NOTIFICATION_CALLBACK_PATH"),
        ("trip", "http://trips.internal:8081/trips/payment-events", "TRIP_SERVICE_URL + "
         "TRIP_CALLBACK_PATH"),
    ]  # fmt: skip
