"""The ASGI entry point every worker of `serve` loads, under Uvicorn (the default) or Hypercorn:
the factory `app.asgi:build`.

Each worker process reads the settings from its environment and builds its own app and pool.
"""

from __future__ import annotations

import multiprocessing

from app import create_app
from app.context import PaymentApp
from payment_service.config import load_settings
from payment_service.logs import configure_logging
from payment_service.process import die_with_parent


def build() -> PaymentApp:
    spawner = multiprocessing.parent_process()
    if spawner is not None and spawner.pid is not None:  # a worker of `serve --workers N`
        die_with_parent(spawner.pid)
    settings = load_settings()
    configure_logging(settings.log_level, queued=True)
    return create_app(settings)
