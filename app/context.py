"""The Quart application type of the API: settings, pool and metrics as typed attributes.

It also replaces parts of Quart that are not its public API (the HTTP connection class, whose
`__call__` HandledInPlace re-implements, the session interface, the request class), so Quart is
pinned to one minor version in pyproject.toml and tests/unit/test_quart_internals.py fails loudly
when the installed Quart is another or one of those parts changed.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, cast

import asyncpg
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart import Quart, current_app
from quart.asgi import ASGIHTTPConnection
from quart.sessions import NullSession, SecureCookieSessionInterface
from quart.wrappers import Request

from app.metrics import Metrics
from app.notifier import OutboxNotifier
from app.service import Charging
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


class PaymentRequest(Request):
    """Quart's request, with its blueprints worked out once per matched rule: Quart asks for them
    before the request, after it and at teardown, and derives them from the endpoint each time."""

    _blueprints: tuple[object, list[str]] | None = None

    @property
    def blueprints(self) -> list[str]:
        rule = self.url_rule
        if self._blueprints is None or self._blueprints[0] is not rule:
            self._blueprints = (rule, super().blueprints)
        return list(self._blueprints[1])


class HandledInPlace(ASGIHTTPConnection):
    """Quart's HTTP connection, with the request handled in the server's own task.

    Quart starts two tasks per request (the handler, and a reader of the body and of the client's
    disconnect), waits for the first to finish and cancels the other. Here only the reader is a
    task and the handler runs where the server called the app. As in Quart, the client's
    disconnect cancels the handler and the call then returns quietly, an error of the reader is
    raised, and the reader is cancelled once the answer is sent.
    """

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        request = self._create_request_from_scope(send)
        handler = asyncio.current_task()
        assert handler is not None
        answered = False
        ended: BaseException | None = None  # the reader's end before the answer: why it ended

        async def read() -> None:
            nonlocal ended
            try:
                await self.handle_messages(request, receive)  # returns on the disconnect
            except Exception as error:
                ended = error
            else:
                ended = asyncio.CancelledError()
            if not answered:
                handler.cancel()

        reader = asyncio.ensure_future(read())
        try:
            await self.handle_request(request, send)
        except asyncio.CancelledError:
            if ended is None:
                raise  # not the reader's doing: the server is cancelling the request
            handler.uncancel()
            if not isinstance(ended, asyncio.CancelledError):
                raise ended from None
        finally:
            answered = True
            reader.cancel()


class PaymentApp(Quart):
    settings: Settings
    metrics: Metrics
    charging: Charging | None = None  # the payment gateway; None with GATEWAY=none
    session_interface = NoSessions()
    asgi_http_class = HandledInPlace
    request_class = PaymentRequest
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
