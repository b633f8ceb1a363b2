"""The configured gateway, built from the settings."""

from __future__ import annotations

from payment_service.config import STRIPE_TEST_KEY_PREFIXES, ConfigurationError, Settings
from payment_service.gateway.interface import Gateway


def check_gateway_settings(settings: Settings) -> None:
    """Raise `ConfigurationError` naming STRIPE_SECRET_KEY when a gateway is wanted without one:
    what `serve` and `relay` check before they start anything."""
    if settings.gateway == "stripe" and settings.stripe_secret_key is None:
        raise ConfigurationError(
            "STRIPE_SECRET_KEY is not set: set it, set GATEWAY=none to record payments without "
            "charging them, or use 'payment-service run', which starts an embedded gateway"
        )


def gateway_from_settings(settings: Settings) -> Gateway | None:
    """The gateway to charge at; None with GATEWAY=none (payments are recorded only).

    Raises `ConfigurationError` naming STRIPE_SECRET_KEY when a gateway is wanted without one.
    The client it makes connects on its first call; close it (`Gateway.close`) in the event loop
    that used it.
    """
    check_gateway_settings(settings)
    if settings.gateway == "none":
        return None
    assert settings.stripe_secret_key is not None
    # Imported here: the SDK is loaded only by a process that charges.
    from payment_service.gateway.stripe_adapter import StripeGateway

    webhook_secret = settings.stripe_webhook_secret
    return StripeGateway(
        api_key=settings.stripe_secret_key.get_secret_value(),
        api_base=settings.stripe_api_base,
        webhook_secret=webhook_secret.get_secret_value() if webhook_secret else None,
        timeout_seconds=settings.gateway_timeout_seconds,
        api_flavour=settings.stripe_api_flavour,
    )


def fallback_payment_method(settings: Settings) -> str | None:
    """The payment method to charge when a request names none: GATEWAY_TEST_PAYMENT_METHOD with a
    test key or the embedded gateway, else None (a live key never charges a made-up method)."""
    key = settings.stripe_secret_key.get_secret_value() if settings.stripe_secret_key else ""
    if settings.stripe_api_flavour == "localstripe" or key.startswith(STRIPE_TEST_KEY_PREFIXES):
        return settings.gateway_test_payment_method
    return None
