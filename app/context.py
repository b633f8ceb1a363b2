"""The Quart application type of the API: settings, pool and metrics as typed attributes."""

from __future__ import annotations

from typing import cast

import asyncpg
from quart import Quart, current_app

from app.metrics import Metrics
from app.notifier import OutboxNotifier
from payment_service.config import Settings
from payment_service.database import PooledConnection, acquire


class PaymentApp(Quart):
    settings: Settings
    metrics: Metrics
    _pool: asyncpg.Pool | None = None
    _notifier: OutboxNotifier | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the database pool is opened when the server starts serving")
        return self._pool

    @property
    def notifier(self) -> OutboxNotifier:
        if self._notifier is None:
            raise RuntimeError("the notifier starts when the server starts serving")
        return self._notifier

    def connection(self) -> PooledConnection:
        return acquire(self.pool)


def current_payment_app() -> PaymentApp:
    return cast(PaymentApp, current_app._get_current_object())  # type: ignore[attr-defined]
