"""Every error becomes an RFC 9457 problem+json answer: domain errors (APIError), HTTP errors from
routing, an oversize body, a database that cannot be reached (503), and anything else (a logged 500
that shows no internals).
"""

from __future__ import annotations

import logging

from quart import Response, g
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from app.context import PaymentApp
from app.errors import PROBLEM_CONTENT_TYPE, APIError, database_unavailable, problem_body
from app.models import MAX_BODY_BYTES
from app.routes import BodyTooLarge
from payment_service.database import UNAVAILABLE_ERRORS, note_unavailable

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def _problem_response(error: APIError) -> Response:
    g.error_code = error.code
    response = Response(
        problem_body(error.problem()),
        status=error.status,
        content_type=PROBLEM_CONTENT_TYPE,
    )
    response.headers.update(error.headers)
    return response


def install_error_handlers(app: PaymentApp) -> None:
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
            note_unavailable(error)  # one warning when it goes, not one per request
            return _problem_response(database_unavailable())
        logger.exception("unhandled error", extra={"request_id": getattr(g, "request_id", None)})
        return _problem_response(
            APIError(500, "INTERNAL_ERROR", "An unexpected error occurred; it has been logged.")
        )
