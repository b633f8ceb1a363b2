"""What runs around every request: the request id, the caller (API_KEYS) and what its key may do
(its scopes), metrics, the access log, and the refusal of paths with empty segments.

Each payment route declares the scope a key needs (`requires` in app.routes; `scope_of` reads it
here); a key with scopes answers 403 INSUFFICIENT_SCOPE on a route outside them, before the body
is read. A key without scopes may do everything.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from quart import Request, Response, g, request
from werkzeug.exceptions import NotFound

from app.context import PaymentApp
from app.errors import APIError
from payment_service.config import DEFAULT_CALLER, ApiKey

ACCESS_LOGGER = "payment_service.access"
access_logger = logging.getLogger(ACCESS_LOGGER)

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


_SCOPE_ATTRIBUTE = "payment_service_scope"
# A route that any valid key may call, whatever its scopes (a route that is gone, say).
ANY_SCOPE = "*"


def bearer_key(authorization: str, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    """The key of an `Authorization: Bearer <token>` header, else None."""
    scheme, _, token = authorization.partition(" ")
    found = key_of_token(token.strip(), keys)
    return found if scheme.lower() == "bearer" else None


def key_of_token(token: str, keys: tuple[ApiKey, ...]) -> ApiKey | None:
    """The key whose token is `token`, else None (the console's sign-in asks too).

    Every configured token is compared, in constant time each, whichever one matches.
    """
    sent = token.encode()
    found = None
    for key in keys:
        if hmac.compare_digest(sent, key.token.encode()):
            found = key
    return found


def bearer_name(authorization: str, keys: tuple[ApiKey, ...]) -> str | None:
    """The key's name for an `Authorization: Bearer <token>` header, else None."""
    key = bearer_key(authorization, keys)
    return None if key is None else key.name


def declare_scope(view: Callable[..., Any], scope: str) -> None:
    """Mark `view` as needing `scope` (app.routes' `requires` does, route by route)."""
    setattr(view, _SCOPE_ATTRIBUTE, scope)


def scope_of(view: Callable[..., Any]) -> str | None:
    """The scope a route's view needs, or None when it declares none."""
    scope: str | None = getattr(view, _SCOPE_ATTRIBUTE, None)
    return scope


def insufficient_scope(scope: str | None) -> APIError:
    """403 for a key whose scopes do not cover the route (RFC 6750's insufficient_scope); it
    names the scope needed, never the key."""
    if scope is None:  # a route that declares no scope is for keys without scopes only
        detail = "This API key may not do this: only a key without scopes may."
        challenge = 'Bearer realm="payment-service", error="insufficient_scope"'
    else:
        detail = f"This API key may not do this: it needs the scope '{scope}'."
        challenge = f'Bearer realm="payment-service", error="insufficient_scope", scope="{scope}"'
    needed: dict[str, Any] = {} if scope is None else {"required_scope": scope}
    return APIError(
        403, "INSUFFICIENT_SCOPE", detail, headers={"WWW-Authenticate": challenge}, **needed
    )


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
    views = app.view_functions

    @app.before_request
    async def start() -> None:
        context, current = _context_and_request()
        context.started = time.perf_counter()
        sent = current.headers.get("X-Request-ID", "")
        context.request_id = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
        # The caller (idempotency scope): with auth off, one shared scope.
        context.caller = None if keys else DEFAULT_CALLER
        if keys and current.path.encode().startswith(protected):
            key = bearer_key(current.headers.get("Authorization", ""), keys)
            if key is None:
                raise unauthorized("payment-service")
            context.caller = key.name
            # No rule matched: the 404 or 405 follows, whatever the key may do.
            if key.scopes is not None and (rule := current.url_rule) is not None:
                scope = scope_of(views[rule.endpoint])
                if scope != ANY_SCOPE and (scope is None or scope not in key.scopes):
                    raise insufficient_scope(scope)
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
