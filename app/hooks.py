"""What runs around every request: the request id, the caller (API_KEYS), metrics, the access log,
and the refusal of paths with empty segments.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

from quart import Response, g, request
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

    @app.before_request
    async def start() -> None:
        g.started = time.perf_counter()
        sent = request.headers.get("X-Request-ID", "")
        g.request_id = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
        # The caller (idempotency scope): with auth off, one shared scope.
        g.caller = None if keys else DEFAULT_CALLER
        if keys and request.path.encode().startswith(protected):
            g.caller = bearer_name(request.headers.get("Authorization", ""), keys)
            if g.caller is None:
                raise unauthorized("payment-service")

    @app.after_request
    async def finish(response: Response) -> Response:
        request_id = getattr(g, "request_id", None) or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        elapsed = time.perf_counter() - getattr(g, "started", time.perf_counter())
        app.metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        app.metrics.latency.labels(route, request.method).observe(elapsed)
        error_code = getattr(g, "error_code", None)
        if response.status_code == 409:
            app.metrics.conflicts.labels(error_code or "CONFLICT").inc()
        if error_code is not None and response.status_code >= 400:
            app.metrics.errors.labels(error_code).inc()
        if access_logger.isEnabledFor(logging.INFO):
            # makeRecord + handle: the same record as access_logger.info(..., extra=...), without
            # the caller lookup (findCaller walks the stack) that the JSON line never shows.
            record = access_logger.makeRecord(
                ACCESS_LOGGER, logging.INFO, __file__, 0, "request", (), None
            )
            record.__dict__.update(
                request_id=request_id,
                caller=getattr(g, "caller", None),  # the API_KEYS name, never the token
                method=request.method,
                path=request.path,
                route=route,
                status=response.status_code,
                duration_ms=round(elapsed * 1000, 2),
            )
            access_logger.handle(record)
        return response


def install_strict_paths(app: PaymentApp) -> None:
    # A path with an empty segment names no resource. Werkzeug would redirect `/payments//1` to a
    # Location built from the Host header (merge_slashes, off in create_app), and its
    # request.path has a leading `//` already stripped: the path as sent is the ASGI scope's.
    @app.before_request
    async def refuse_empty_segments() -> None:
        if "//" in request.scope["path"]:
            raise NotFound()
