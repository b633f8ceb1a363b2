"""The HTTP API of the Payment Service (Quart on Hypercorn).

`create_app(settings)` builds the application; nothing connects or reads the environment at import
time. The database pool opens when the server starts serving and closes when it stops.
"""

from __future__ import annotations

import copy
import hmac
import logging
import re
import time
import uuid
from typing import Any

from quart import Response, g, request
from quart_schema import QuartSchema, document_response, hide
from quart_schema.openapi import HttpSecurityScheme, Info, OpenAPIProvider
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import BaseConverter, RequestRedirect

from app.context import PaymentApp
from app.errors import PROBLEM_CONTENT_TYPE, APIError, database_unavailable, problem_body
from app.metrics import Metrics
from app.models import (
    DRAIN_BODY_BYTES,
    INT64_MAX,
    MAX_BODY_BYTES,
    Health,
    Liveness,
    amount_schema,
)
from app.notifier import OutboxNotifier
from app.routes import IDEMPOTENCY_KEY_HEADER, BodyTooLarge, PaymentIdConverter, blueprint
from payment_service import SERVICE_NAME, __version__
from payment_service.config import DEFAULT_CALLER, Settings
from payment_service.database import UNAVAILABLE_ERRORS, create_pool, keep_session
from payment_service.migrations import pending_check

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("payment_service.access")

HEALTH_TIMEOUT_SECONDS = 2.0
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_HTTP_CODES = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


class _ProblemAwareOpenAPI(OpenAPIProvider):
    """The document says what the API enforces (DESIGN §4), so that a request valid by the
    document is never refused for a reason it hides: bodies required, the Idempotency-Key header,
    the configured MAX_PAYMENT_AMOUNT, payment id limits, open health routes. Error responses are
    documented as application/problem+json, as they are sent."""

    _cached: dict[str, Any] | None = None

    def build_path_parameter(self, name: str, converter: BaseConverter) -> dict[str, Any]:
        parameter = super().build_path_parameter(name, converter)
        if isinstance(converter, PaymentIdConverter):
            parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": INT64_MAX}
        return parameter

    def schema(self) -> dict[str, Any]:
        if self._cached is None:
            document = super().schema()
            payments_prefix = self._app.config["API_PREFIX"] + "/payments"
            for path, operations in document.get("paths", {}).items():
                for method, operation in operations.items():
                    _enforced(operation, method, open_route=not path.startswith(payments_prefix))
            _replace(document, amount_schema(), amount_schema(self._app.config["MAX_AMOUNT"]))
            self._cached = document
        return self._cached


def _enforced(operation: dict[str, Any], method: str, *, open_route: bool) -> None:
    if open_route:
        operation["security"] = []
    if "requestBody" in operation:
        operation["requestBody"]["required"] = True
    if method == "post":
        operation["parameters"] = [*operation.get("parameters", []), IDEMPOTENCY_KEY_HEADER]
    for status, response in operation.get("responses", {}).items():
        content = response.get("content", {})
        if int(status) >= 400 and "application/json" in content:
            content[PROBLEM_CONTENT_TYPE] = content.pop("application/json")


def _replace(node: Any, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Replace, in place, every schema that is `old` (titled or not) within `node` by `new`."""
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        if isinstance(child, dict) and child.get("anyOf") == old["anyOf"]:
            child.update(copy.deepcopy(new))
        else:
            _replace(child, old, new)


def create_app(settings: Settings) -> PaymentApp:
    app = PaymentApp(__name__)
    app.settings = settings
    app.metrics = Metrics()
    app.config["MAX_CONTENT_LENGTH"] = DRAIN_BODY_BYTES
    app.config["API_PREFIX"] = settings.api_prefix
    app.config["MAX_AMOUNT"] = settings.max_payment_amount
    # `//payments` must not answer a redirect whose Location is built from the Host header.
    app.url_map.merge_slashes = False
    app.url_map.converters["payment_id"] = PaymentIdConverter
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # No per-request asyncio.wait_for around handlers (a task per request): every handler is
    # already bounded by the pool's acquire timeout and the connections' command timeout.
    app.config["RESPONSE_TIMEOUT"] = None
    QuartSchema(
        app,
        info=Info(title="Payment Service", version=__version__),
        security_schemes={"bearer": HttpSecurityScheme(scheme="bearer")}
        if settings.api_keys
        else None,
        security=[{"bearer": []}] if settings.api_keys else None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        openapi_provider_class=_ProblemAwareOpenAPI,
    )
    app.register_blueprint(blueprint, url_prefix=settings.api_prefix or None)
    _install_lifecycle(app)
    _install_request_hooks(app)
    _install_strict_paths(app)
    _install_error_handlers(app)
    _install_operational_routes(app)
    return app


def _install_lifecycle(app: PaymentApp) -> None:
    @app.before_serving
    async def open_pool() -> None:
        settings = app.settings
        try:
            app._pool = await create_pool(
                settings.dsn(),
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
                reset=keep_session,
            )
            async with app.connection() as conn:
                await pending_check(conn)
        except UNAVAILABLE_ERRORS as error:
            if app._pool is not None:
                app._pool.terminate()
            # Serve anyway: requests answer 503 until the database is back, and the pool
            # connects lazily then. The schema check is the migrate job's (compose runs it).
            logger.warning(
                "database unavailable at start; answering 503 until it is back",
                extra={"error": type(error).__name__},
            )
            app._pool = await create_pool(
                settings.dsn(), min_size=0, max_size=settings.db_pool_max, reset=keep_session
            )
        app._notifier = OutboxNotifier(app.pool)
        app._notifier.start()
        if not settings.callback_signing_secret:
            logger.warning("CALLBACK_SIGNING_SECRET is unset: callbacks will be unsigned")
        logger.info("API ready", extra={"api_prefix": settings.api_prefix or "/"})

    @app.after_serving
    async def close_pool() -> None:
        if app._notifier is not None:
            await app._notifier.stop()
            app._notifier = None
        if app._pool is not None:
            await app._pool.close()
            app._pool = None


def _install_request_hooks(app: PaymentApp) -> None:
    protected = (app.settings.api_prefix + "/payments").encode()
    keys = [(key.token.encode(), key.name) for key in app.settings.api_keys]

    def authenticate(authorization: str) -> str | None:
        """The caller's name for an `Authorization: Bearer <token>` header, else None.

        Every configured token is compared, in constant time each, whichever one matches.
        """
        scheme, _, token = authorization.partition(" ")
        sent = token.strip().encode()
        caller = None
        for expected, name in keys:
            if hmac.compare_digest(sent, expected):
                caller = name
        return caller if scheme.lower() == "bearer" else None

    @app.before_request
    async def start() -> None:
        g.started = time.perf_counter()
        sent = request.headers.get("X-Request-ID", "")
        g.request_id = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
        # The caller (idempotency scope, DESIGN §5): with auth off, one shared scope.
        g.caller = None if keys else DEFAULT_CALLER
        if keys and request.path.encode().startswith(protected):
            g.caller = authenticate(request.headers.get("Authorization", ""))
            if g.caller is None:
                raise APIError(
                    401,
                    "UNAUTHORIZED",
                    "Send a valid API key as 'Authorization: Bearer <key>'.",
                    headers={"WWW-Authenticate": 'Bearer realm="payment-service"'},
                )

    @app.after_request
    async def finish(response: Response) -> Response:
        request_id = getattr(g, "request_id", None) or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        elapsed = time.perf_counter() - getattr(g, "started", time.perf_counter())
        app.metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        app.metrics.latency.labels(route, request.method).observe(elapsed)
        if response.status_code == 409:
            app.metrics.conflicts.labels(getattr(g, "error_code", "CONFLICT")).inc()
        if access_logger.isEnabledFor(logging.INFO):
            access_logger.info(
                "request",
                extra={
                    "request_id": request_id,
                    "caller": getattr(g, "caller", None),  # the API_KEYS name, never the token
                    "method": request.method,
                    "path": request.path,
                    "route": route,
                    "status": response.status_code,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
        return response


def _install_strict_paths(app: PaymentApp) -> None:
    # A path with an empty segment names no resource. Werkzeug would redirect `/payments//1` to a
    # Location built from the Host header (merge_slashes, off above), and its request.path has a
    # leading `//` already stripped: the path as sent is the ASGI scope's.
    @app.before_request
    async def refuse_empty_segments() -> None:
        if "//" in request.scope["path"]:
            raise NotFound()


def _problem_response(error: APIError) -> Response:
    g.error_code = error.code
    response = Response(
        problem_body(error.problem()),
        status=error.status,
        content_type=PROBLEM_CONTENT_TYPE,
    )
    response.headers.update(error.headers)
    return response


def _install_error_handlers(app: PaymentApp) -> None:
    @app.errorhandler(APIError)
    async def api_error(error: APIError) -> Response:
        return _problem_response(error)

    @app.errorhandler(BodyTooLarge)
    async def body_too_large(error: BodyTooLarge) -> Response:
        g.error_code = error.code
        document = problem_body(error.problem()).encode()
        response = Response(
            error.answer_then_drain(document), status=413, content_type=PROBLEM_CONTENT_TYPE
        )
        response.headers["Content-Length"] = str(len(document))
        return response

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        if isinstance(error, RequestRedirect):  # no route redirects; never one built from Host
            error = NotFound()
        status = error.code or 500
        code = _HTTP_CODES.get(status, "HTTP_ERROR")
        detail = {
            404: "No such resource.",
            405: "This method is not allowed on this resource.",
            413: f"The body is larger than {MAX_BODY_BYTES} bytes.",
        }.get(status, error.description or "")
        headers = {}
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            headers["Allow"] = ", ".join(sorted(error.valid_methods))
        return _problem_response(APIError(status, code, detail, headers=headers))

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        if isinstance(error, UNAVAILABLE_ERRORS):
            logger.warning("database unavailable", extra={"error": type(error).__name__})
            return _problem_response(database_unavailable())
        logger.exception("unhandled error", extra={"request_id": getattr(g, "request_id", None)})
        return _problem_response(
            APIError(500, "INTERNAL_ERROR", "An unexpected error occurred; it has been logged.")
        )


def _install_operational_routes(app: PaymentApp) -> None:
    @app.get("/health")
    @document_response(Health, 200)
    @document_response(Health, 503)
    async def health() -> tuple[dict[str, Any], int]:
        database = "ok"
        try:
            async with app.connection() as conn:
                await conn.fetchval("SELECT 1", timeout=HEALTH_TIMEOUT_SECONDS)
        except Exception as error:  # any failure to answer is "unhealthy"
            logger.warning("health check failed", extra={"error": type(error).__name__})
            database = "unavailable"
        document = Health(
            status="healthy" if database == "ok" else "unhealthy",
            service=SERVICE_NAME,
            version=__version__,
            checks={"database": database},
        )
        return document.model_dump(), 200 if database == "ok" else 503

    @app.get("/health/live")
    @document_response(Liveness, 200)
    async def live() -> dict[str, str]:
        return {"status": "alive", "service": SERVICE_NAME}

    @app.get("/metrics")
    @hide
    async def metrics() -> Response:
        return Response(app.metrics.render(), content_type=app.metrics.content_type)


__all__ = ["create_app"]
