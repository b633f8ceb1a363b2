"""The gateway's settings: defaults, parsing, secrets kept out of reprs and errors, and what
ENVIRONMENT=production refuses."""

from __future__ import annotations

import base64

import pytest

from payment_service.config import ConfigurationError, load_settings
from payment_service.gateway.factory import fallback_payment_method, gateway_from_settings

# No setting leaks in from the shell or a .env (autouse), and refusals are one line.
from tests.unit.test_config import clean_environment, refused  # noqa: F401

CALLBACK_SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
LIVE_KEY = "sk_live_canary0123456789"
WEBHOOK_SECRET = "whsec_canary-webhook-secret"


def production(monkeypatch: pytest.MonkeyPatch, **variables: str) -> None:
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("API_KEYS", "k1")
    monkeypatch.setenv("CALLBACK_SIGNING_SECRET", CALLBACK_SECRET)
    monkeypatch.setenv("NOTIFICATION_SERVICE_URL", "http://10.0.0.5:8085")  # not loopback
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.gateway == "stripe"
    assert settings.stripe_secret_key is None and settings.stripe_webhook_secret is None
    assert settings.stripe_api_base == "https://api.stripe.com"
    assert settings.stripe_api_flavour == "stripe"
    assert settings.gateway_methods == ("CARD", "UPI", "WALLET", "NETBANKING")
    assert settings.gateway_timeout_seconds == 10
    assert settings.gateway_test_payment_method == "pm_card_visa"
    assert settings.gateway_max_checks == 12
    assert settings.gateway_reconcile_interval == 3600
    assert settings.gateway_events_retention_days == 30


def test_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY", "none")
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_abc")
    monkeypatch.setenv("STRIPE_API_BASE", "http://127.0.0.1:8420/")
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("STRIPE_API_FLAVOUR", "localstripe")
    monkeypatch.setenv("GATEWAY_METHODS", "card, upi")
    monkeypatch.setenv("GATEWAY_TIMEOUT_SECONDS", "2.5")
    monkeypatch.setenv("GATEWAY_MAX_CHECKS", "3")
    settings = load_settings()
    assert settings.gateway == "none"
    assert settings.stripe_secret_key is not None
    assert settings.stripe_secret_key.get_secret_value() == "sk_test_abc"
    assert settings.stripe_api_base == "http://127.0.0.1:8420"
    assert settings.stripe_api_flavour == "localstripe"
    assert settings.gateway_methods == ("CARD", "UPI")
    assert settings.gateway_timeout_seconds == 2.5
    assert settings.gateway_max_checks == 3


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("GATEWAY_RECONCILE_INTERVAL", "0", 0.0),  # off
        ("GATEWAY_RECONCILE_INTERVAL", "900", 900.0),
        ("GATEWAY_EVENTS_RETENTION_DAYS", "7", 7.0),
    ],
)
def test_reconciliation_and_retention_settings(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: float
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(load_settings(), name.lower()) == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_RECONCILE_INTERVAL", "-1"),
        ("GATEWAY_RECONCILE_INTERVAL", "700000"),  # more than a week
        ("GATEWAY_EVENTS_RETENTION_DAYS", "0"),
        ("GATEWAY_EVENTS_RETENTION_DAYS", "soon"),
    ],
)
def test_reconciliation_and_retention_settings_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_settings()


def test_an_empty_secret_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_SECRET_KEY", "")
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", " ")
    settings = load_settings()
    assert settings.stripe_secret_key is None and settings.stripe_webhook_secret is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY", "paypal"),
        ("STRIPE_API_BASE", "api.stripe.com"),
        ("STRIPE_API_BASE", "https://api.stripe.com/v1"),
        ("STRIPE_API_FLAVOUR", "stripe-mock"),
        ("GATEWAY_METHODS", "CARD,CHEQUE"),
        ("GATEWAY_METHODS", "CARD,CASH"),
        ("GATEWAY_TIMEOUT_SECONDS", "0"),
        ("GATEWAY_MAX_CHECKS", "0"),
        ("GATEWAY_TEST_PAYMENT_METHOD", ""),
    ],
)
def test_bad_values_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    assert variable in refused()


def test_secrets_stay_out_of_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_SECRET_KEY", LIVE_KEY)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    settings = load_settings()
    for text in (repr(settings), str(settings), str(settings.stripe_secret_key)):
        assert "canary" not in text


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET}, "STRIPE_SECRET_KEY"),
        ({"STRIPE_SECRET_KEY": "sk_test_canary", "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET},
         "STRIPE_SECRET_KEY"),
        ({"STRIPE_SECRET_KEY": "rk_test_canary", "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET},
         "STRIPE_SECRET_KEY"),
        ({"STRIPE_SECRET_KEY": LIVE_KEY}, "STRIPE_WEBHOOK_SECRET"),
        ({"STRIPE_SECRET_KEY": LIVE_KEY, "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
          "STRIPE_API_FLAVOUR": "localstripe"}, "STRIPE_API_FLAVOUR"),
        ({"STRIPE_SECRET_KEY": LIVE_KEY, "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
          "STRIPE_API_BASE": "http://gateway.internal"}, "STRIPE_API_BASE"),
    ],
)  # fmt: skip
def test_production_refuses_a_test_key_a_missing_webhook_secret_and_plain_http(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: str
) -> None:
    production(monkeypatch, **variables)
    message = refused()
    assert named in message
    assert "canary" not in message, "a secret is named, never quoted"


def test_production_with_a_live_key_and_a_webhook_secret_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    production(monkeypatch, STRIPE_SECRET_KEY=LIVE_KEY, STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
    assert load_settings().environment == "production"


def test_production_without_a_gateway_needs_no_gateway_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    production(monkeypatch, GATEWAY="none")
    assert load_settings().gateway == "none"


async def test_the_configured_gateway() -> None:
    assert gateway_from_settings(load_settings(gateway="none")) is None
    with pytest.raises(ConfigurationError, match="STRIPE_SECRET_KEY"):
        gateway_from_settings(load_settings())
    gateway = gateway_from_settings(load_settings(stripe_secret_key=LIVE_KEY))
    assert gateway is not None
    assert "canary" not in repr(gateway)
    await gateway.close()


def test_the_test_payment_method_only_with_a_test_key_or_the_embedded_gateway() -> None:
    assert fallback_payment_method(load_settings(stripe_secret_key="sk_test_x")) == "pm_card_visa"
    embedded = load_settings(stripe_api_flavour="localstripe", gateway_test_payment_method="pm_x")
    assert fallback_payment_method(embedded) == "pm_x"
    assert fallback_payment_method(load_settings(stripe_secret_key=LIVE_KEY)) is None
    assert fallback_payment_method(load_settings()) is None


@pytest.mark.parametrize("key", [LIVE_KEY, "rk_live_canary0123456789"])
@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"STRIPE_API_FLAVOUR": "localstripe"}, "STRIPE_API_FLAVOUR=localstripe"),
        ({"STRIPE_API_FLAVOUR": "localstripe", "STRIPE_API_BASE": "https://api.stripe.com"},
         "STRIPE_API_FLAVOUR=localstripe"),
        ({"STRIPE_API_BASE": "http://gateway:8420"}, "STRIPE_API_BASE is plain http://"),
    ],
)  # fmt: skip
def test_a_live_key_is_refused_with_the_fake_gateways_settings_in_any_environment(
    monkeypatch: pytest.MonkeyPatch, key: str, variables: dict[str, str], named: str
) -> None:
    monkeypatch.setenv("STRIPE_SECRET_KEY", key)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    message = refused()
    assert named in message
    assert "canary" not in message, "a secret is named, never quoted"


@pytest.mark.parametrize(
    "variables",
    [
        {"STRIPE_SECRET_KEY": "sk_test_abc", "STRIPE_API_BASE": "http://gateway:8420",
         "STRIPE_API_FLAVOUR": "localstripe"},
        {"STRIPE_SECRET_KEY": LIVE_KEY},
        {"STRIPE_SECRET_KEY": LIVE_KEY, "GATEWAY": "none", "STRIPE_API_BASE": "http://gateway:8420"},
    ],
    ids=["a test key with the fake", "a live key with real Stripe", "no gateway"],
)  # fmt: skip
def test_the_fake_with_a_test_key_and_a_live_key_with_real_stripe_start(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert load_settings().stripe_secret_key is not None
