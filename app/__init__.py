"""The HTTP API of the Payment Service (Quart, served by Uvicorn or Hypercorn: app/server.py).

`create_app(settings)` builds the application; nothing connects or reads the environment at import
time. Its parts live in their own modules: the routes (`routes`), the admin API (`admin`, only
with ADMIN_API_KEYS) and the operator console (`console`, likewise), the pool's lifecycle
(`lifecycle`), what runs around every request (`hooks`), errors as problem+json (`handlers`),
health and metrics (`ops`), the payment gateway's webhook (`webhook`, only with a gateway) and the
OpenAPI document (`openapi`).
"""

from __future__ import annotations

from app import admin, webhook
from app.console import install_console
from app.context import PaymentApp
from app.handlers import install_error_handlers
from app.hooks import install_request_hooks
from app.lifecycle import install_lifecycle
from app.metrics import Metrics
from app.models import DRAIN_BODY_BYTES
from app.openapi import install_openapi
from app.ops import install_operational_routes
from app.routes import PaymentIdConverter, blueprint
from app.service import charging_from_settings
from payment_service.config import Settings


def create_app(settings: Settings) -> PaymentApp:
    app = PaymentApp(__name__)
    app.settings = settings
    app.metrics = Metrics()
    # The gateway's client connects when it first calls; it is closed when serving stops.
    app.charging = charging_from_settings(settings)
    app.config["MAX_CONTENT_LENGTH"] = DRAIN_BODY_BYTES
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # No per-request asyncio.wait_for around handlers (a task per request): every handler is
    # already bounded by the pool's acquire timeout and the connections' command timeout.
    app.config["RESPONSE_TIMEOUT"] = None
    # `//payments` must not answer a redirect whose Location is built from the Host header.
    app.url_map.merge_slashes = False
    app.url_map.converters["payment_id"] = PaymentIdConverter
    app.url_map.converters["endpoint_name"] = admin.EndpointNameConverter
    install_openapi(app, settings)
    app.register_blueprint(blueprint, url_prefix=settings.api_prefix or None)
    if app.charging is not None:  # else the webhook route is absent (404)
        app.register_blueprint(webhook.blueprint, url_prefix=settings.api_prefix or None)
    if settings.admin_api_keys:  # else every /admin path is 404, as if absent
        app.register_blueprint(admin.blueprint, url_prefix=settings.api_prefix + "/admin")
        install_console(app)
    install_lifecycle(app)
    install_request_hooks(app)
    install_error_handlers(app)
    install_operational_routes(app)
    return app


__all__ = ["create_app"]
