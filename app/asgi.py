"""The ASGI entry point Hypercorn's workers load: `app.asgi:build()`.

Each worker process reads the settings from its environment and builds its own app and pool.
"""

from __future__ import annotations

from app import create_app
from app.context import PaymentApp
from payment_service.config import load_settings
from payment_service.logs import configure_logging


def build() -> PaymentApp:
    settings = load_settings()
    configure_logging(settings.log_level)
    return create_app(settings)
