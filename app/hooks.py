"""What runs around every request: the request id, the caller (API_KEYS), metrics, the access log,
and the refusal of paths with empty segments.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from typing import Any

from quart import Request, Response, g, request
from werkzeug.exceptions import NotFound

from app.context import PaymentApp
from app.errors import APIError
from payment_service.config import DEFAULT_CALLER, ApiKey

ACCESS_LOGGER = "payment_service.access"
access_logger = logging.getLogger(ACCESS_LOGGER)

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def bearer_name(authorization: str, keys: tuple[ApiKey, ...]) -> str | None:
    """The key's name for an `Authorization: Bearer <token>` header, else None.

    Every configured token is compared, in constant time each, whichever one matches.
    """
    scheme, _, token = authorization.partition(" ")
    sent = token.strip().encode()
    caller = None
    for key in keys:
        if hmac.compare_digest(sent, key.token.encode()):
            caller = key.name
    return caller if scheme.lower() == "bearer" else None


def unauthorized(realm: str) -> APIError:
    return APIError(
        401,
        "UNAUTHORIZED",
        "Send a valid API key as 'Authorization: Bearer <key>'.",
        headers={"WWW-Authenticate": f'Bearer realm="{realm}"'},
    )


def install_request_hooks(app: PaymentApp) -> None:
    protected = (app.settings.api_prefix + "/payments").encode()
    keys = app.settings.api_keys
    metrics = app.metrics

    @app.before_request
    async def start() -> None:
        context, current = _context_and_request()
        context.started = time.perf_counter()
        sent = current.headers.get("X-Request-ID", "")
        context.request_id = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
        # The caller (idempotency scope): with auth off, one shared scope.
        context.caller = None if keys else DEFAULT_CALLER
        if keys and current.path.encode().startswith(protected):
            context.caller = bearer_name(current.headers.get("Authorization", ""), keys)
            if context.caller is None:
                raise unauthorized("payment-service")
        refuse_empty_segments(current.scope["path"])

    @app.after_request
    async def finish(response: Response) -> Response:
        context, current = _context_and_request()
        request_id = getattr(context, "request_id", None) or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        rule = current.url_rule
        route = rule.rule if rule is not None else "unmatched"
        method = current.method
        status = response.status_code
        elapsed = time.perf_counter() - getattr(context, "started", time.perf_counter())
        metrics.requests_of(route, method, str(status)).inc()
        metrics.latency_of(route, method).observe(elapsed)
        error_code = getattr(context, "error_code", None)
        if status == 409:
            metrics.conflicts_of(error_code or "CONFLICT").inc()
        if error_code is not None and status >= 400:
            metrics.errors_of(error_code).inc()
        if access_logger.isEnabledFor(logging.INFO):
            # makeRecord + handle: the same record as access_logger.info(..., extra=...), without
            # the caller lookup (findCaller walks the stack) that the JSON line never shows.
            record = access_logger.makeRecord(
                ACCESS_LOGGER, logging.INFO, __file__, 0, "request", (), None
            )
            record.__dict__.update(
                request_id=request_id,
                caller=getattr(context, "caller", None),  # the API_KEYS name, never the token
                method=method,
                path=current.path,
                route=route,
                status=status,
                duration_ms=round(elapsed * 1000, 2),
            )
            access_logger.handle(record)
        return response


def _context_and_request() -> tuple[Any, Request]:
    """`g` and `request` themselves: every attribute of the proxies is a context-variable lookup."""
    return g._get_current_object(), request._get_current_object()  # type: ignore[attr-defined]


def refuse_empty_segments(path: str) -> None:
    """A path with an empty segment names no resource: 404.

    Werkzeug would redirect `/payments//1` to a Location built from the Host header
    (merge_slashes, off in create_app), and its request.path has a leading `//` already stripped:
    the path as sent is the ASGI scope's.
    """
    if "//" in path:
        raise NotFound()
