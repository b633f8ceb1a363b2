"""The Quart application type of the API: settings, pool and metrics as typed attributes."""

from __future__ import annotations

import functools
from typing import Any, cast

import asyncpg
from quart import Quart, current_app
from quart.sessions import NullSession, SecureCookieSessionInterface

from app.metrics import Metrics
from app.notifier import OutboxNotifier
from payment_service.config import Settings
from payment_service.database import PooledConnection, acquire


class NoSessions(SecureCookieSessionInterface):
    """The API keeps no sessions (no cookies, no secret key). Quart's default interface opened a
    session per request only to find no secret key and make a new null session; here every
    request gets the same null session, which refuses to be written to."""

    _null = NullSession()

    async def open_session(self, app: Quart, request: Any) -> NullSession:
        return self._null

    async def save_session(self, app: Quart, session: Any, response: Any) -> None:
        """Never called: Quart saves no null session."""


class PaymentApp(Quart):
    settings: Settings
    metrics: Metrics
    session_interface = NoSessions()
    _pool: asyncpg.Pool | None = None
    _notifier: OutboxNotifier | None = None

    def ensure_async(self, func: Any) -> Any:
        """Quart's, remembered per function: Quart asks it of every hook, handler and session
        call on every request, and inspects the function each time."""
        wrapped = self._async_of.get(func)
        if wrapped is None:
            wrapped = self._async_of[func] = super().ensure_async(func)
        return wrapped

    @functools.cached_property
    def _async_of(self) -> dict[Any, Any]:
        return {}

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
