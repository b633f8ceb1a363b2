"""HTTP handlers: parse → call one service function → answer. No SQL here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from quart import Blueprint, Response, g, request
from quart.wrappers.request import Body
from quart_schema import document_querystring, document_request, document_response
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.routing import BaseConverter

from app import payments, refunds, service
from app.context import current_payment_app
from app.errors import PROBLEM_CONTENT_TYPE, APIError
from app.hooks import ANY_SCOPE, declare_scope
from app.idempotency import Guard, IdempotencyKey, fingerprint, request_path
from app.models import (
    DRAIN_BODY_BYTES,
    INT64_MAX,
    MAX_BODY_BYTES,
    CreatePayment,
    CreateRefund,
    ListQuery,
    PaymentList,
    PaymentWithRefunds,
    PendingPayment,
    Problem,
    RefundList,
    RefundResult,
    Settle,
    integers_below,
    parse_json_object,
    validate_model,
)
from app.models import Payment as PaymentDocument
from payment_service.config import SCOPES

JSON = "application/json"
ERRORS_POST = (400, 401, 409, 413, 415, 422, 503)
DRAIN_SECONDS = 10  # how long a refused body is read and dropped before the connection closes

blueprint = Blueprint("payments", __name__)


F = TypeVar("F", bound=Callable[..., Any])


def document_errors(*statuses: int) -> Callable[[F], F]:
    def decorator(func: F) -> F:
        for status in statuses:
            func = document_response(Problem, status)(func)
        return func

    return decorator


def requires(scope: str) -> Callable[[F], F]:
    """The scope an API key needs for the route (one of SCOPES, or ANY_SCOPE: any key; a key
    without scopes may do everything): checked by the request hook before the body is read, 403
    documented."""
    if scope not in SCOPES and scope != ANY_SCOPE:
        raise ValueError(f"unknown scope {scope!r}")

    def decorator(func: F) -> F:
        declare_scope(func, scope)
        return func if scope == ANY_SCOPE else document_errors(403)(func)

    return decorator


# -- request plumbing ----------------------------------------------------------------------------
class PaymentIdConverter(BaseConverter):
    """`<payment_id:…>`: ASCII digits without a leading zero that fit a bigint; else no match (404).

    Werkzeug's `int` converter takes `007`, the Arabic-Indic digit three and any size.
    """

    # The ids 1 to INT64_MAX, spelled out: a converter's ValidationError would turn into a 405.
    regex = "|".join(integers_below(str(INT64_MAX + 1)))
    part_isolating = True

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: Any) -> str:
        return str(int(value))


class BodyTooLarge(APIError):
    """413 PAYLOAD_TOO_LARGE, decided without keeping the body: from Content-Length before a
    byte is read, or as soon as a chunked body passes MAX_BODY_BYTES."""

    def __init__(self, body: Body, limit: int = MAX_BODY_BYTES) -> None:
        detail = f"The body is larger than {limit} bytes."
        super().__init__(413, "PAYLOAD_TOO_LARGE", detail)
        self._body = body

    async def answer_then_drain(self, document: bytes) -> AsyncIterator[bytes]:
        """Send the answer at once, then read and drop what the client still sends (up to
        DRAIN_BODY_BYTES): closing on unread data would reset the connection, and a client still
        sending would lose the 413. Beyond that, Quart has refused the body already."""
        yield document
        drained = 0
        with contextlib.suppress(RequestEntityTooLarge, TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                async for chunk in self._body:
                    drained += len(chunk)
                    if drained > DRAIN_BODY_BYTES:
                        break


async def json_body() -> dict[str, Any]:
    # The exact header most clients send needs no parsing into type and parameters.
    sent = request.headers.get("Content-Type")
    mimetype = JSON if sent == JSON else request.mimetype
    if mimetype != JSON and not (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    ):
        raise APIError(415, "UNSUPPORTED_MEDIA_TYPE", "Send the body as application/json.")
    body = request.body
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise BodyTooLarge(body)
    parts: list[bytes] = []
    size = 0
    async for chunk in body:  # past MAX_CONTENT_LENGTH (declared), Quart raises a 413 itself
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(body)
        parts.append(chunk)
    return parse_json_object(b"".join(parts))


async def _drop_body() -> None:
    """Read what the client sends and keep none of it (up to MAX_BODY_BYTES, past which Quart
    refuses it): an answer sent over an unread body could reset the connection before the
    client reads it."""
    size = 0
    async for chunk in request.body:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(request.body)


# RFC 8941 sf-string (the Idempotency-Key draft's form): printable ASCII in quotes, with \" and
# \\ escaped.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')


IDEMPOTENCY_KEY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "The idempotency key, instead of the body's idempotency_key (one of them is required; "
        'both must then be equal). A quoted structured-field string "abc" is the key abc.'
    ),
    "schema": {
        "type": "string",
        "pattern": (
            r"^([\x21\x23-\x7e]([\x20-\x7e]{0,253}[\x21-\x7e])?"
            r'|"([\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\]){1,255}")$'
        ),
    },
}


def _header_key() -> str | None:
    """The Idempotency-Key header's key: sent once, bare or as a structured-field string."""
    values = request.headers.getlist("Idempotency-Key")
    if len(values) > 1:
        raise APIError(
            400, "IDEMPOTENCY_KEY_INVALID", "Send one Idempotency-Key header, not several."
        )
    if not values or not values[0].startswith('"'):
        return values[0] if values else None
    quoted = _SF_STRING.fullmatch(values[0])
    if quoted is None:
        raise APIError(
            400,
            "IDEMPOTENCY_KEY_INVALID",
            'The quoted Idempotency-Key header is not a structured-field string such as "abc".',
        )
    return re.sub(r"\\(.)", r"\1", quoted.group(1))


def _idempotency_key(data: dict[str, Any]) -> str:
    """The key from the body or the Idempotency-Key header (validated with the body model)."""
    header = _header_key()
    body = data.get("idempotency_key")
    if header is not None and body is not None and header != body:
        raise APIError(
            400,
            "IDEMPOTENCY_KEY_MISMATCH",
            "The Idempotency-Key header and the body's idempotency_key differ; send one key.",
        )
    if header is None and body is None:
        raise APIError(
            400,
            "IDEMPOTENCY_KEY_MISSING",
            "Send an idempotency_key in the body or an Idempotency-Key header.",
        )
    if body is None:
        data["idempotency_key"] = header
    return data["idempotency_key"]  # type: ignore[no-any-return]


def write_guard(key: str, route: str, params: dict[str, Any], model: Any, **decided: Any) -> Guard:
    """The key's guard, in the scope of `g.caller` (the API key's name, `admin:<name>`,
    `console:<name>`); `decided` are body fields the request left to the service (the currency),
    fingerprinted with the values they took."""
    ttl = current_payment_app().settings.idempotency_key_ttl
    return guard_for(key, g.caller, route, params, model, ttl_seconds=ttl, **decided)


def guard_for(
    key: str,
    caller: str,
    route: str,
    params: dict[str, Any],
    model: Any,
    *,
    ttl_seconds: int,
    **decided: Any,
) -> Guard:
    """The guard of `key` in `caller`'s scope for a POST to `route` with this body (`model`):
    what `write_guard` builds in a request, and the command line outside one."""
    body = model.model_dump(mode="json", exclude={"idempotency_key", "metadata"}, exclude_none=True)
    body.update(decided)
    metadata = getattr(model, "metadata", None)
    if metadata is not None:  # its numbers stay exact Decimals, not strings
        body["metadata"] = metadata
    return Guard(
        key=IdempotencyKey.from_key(key, caller),  # the scope: set by the auth hook
        path=request_path("POST", route),
        fingerprint=fingerprint("POST", route, params, body),
        ttl_seconds=ttl_seconds,
    )


def answer_outcome(outcome: service.Outcome, route: str) -> Response:
    app = current_payment_app()
    response = Response(
        outcome.body,
        status=outcome.status,
        content_type=JSON if outcome.status < 400 else PROBLEM_CONTENT_TYPE,
    )
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
        app.metrics.replays_of(route).inc()
    elif outcome.status < 300:
        app.notifier.poke()  # every successful write committed an outbox event
    return response


# -- write endpoints -----------------------------------------------------------------------------
@blueprint.post("/payments")
@requires("payments:write")
@document_request(CreatePayment)
@document_response(PaymentDocument, 200)
@document_response(PendingPayment, 202)
@document_errors(*ERRORS_POST)
async def post_payment() -> Response:
    """Charge a trip. Safe to retry with the same idempotency key.

    200: the gateway decided (`status` SUCCESS, or FAILED with `failure_code` and
    `failure_message`); 202: not decided yet (PENDING; poll the payment)."""
    app = current_payment_app()
    settings = app.settings
    data = await json_body()
    key = _idempotency_key(data)
    model = validate_model(CreatePayment, data, max_amount=settings.max_payment_amount)
    currency = model.currency or settings.default_currency
    charging = app.charging if app.charging and model.method in app.charging.methods else None
    payment_method = None
    if charging is not None:
        payment_method = model.payment_method or charging.fallback_payment_method
        if payment_method is None:
            raise APIError(
                400,
                "PAYMENT_METHOD_REQUIRED",
                "Name the payer's payment method (payment_method, the gateway's pm_… id).",
            )
        if problem := service.amount_problem(model.amount, currency):
            raise APIError(400, "AMOUNT_NOT_REPRESENTABLE", problem)
    guard = write_guard(key, "/payments", {}, model, currency=currency)
    outcome = await service.create_payment(
        app.pool,
        model,
        guard=guard,
        currency=currency,
        asynchronous=model.method in settings.async_methods,
        charging=charging,
        payment_method=payment_method,
    )
    if not outcome.replayed and outcome.created is not None:
        app.metrics.payments_created_of(outcome.created).inc()
    return answer_outcome(outcome, "/payments")


@blueprint.post("/payments/<payment_id:payment_id>/refunds")
@requires("refunds:write")
@document_request(CreateRefund)
@document_response(RefundResult, 200)
@document_response(RefundResult, 202)
@document_errors(404, *ERRORS_POST)
async def post_refund(payment_id: int) -> Response:
    """Refund all or part of a payment. Several partial refunds may add up to the amount.

    200: REFUNDED, or FAILED when the gateway refused it (its amount may be refunded again);
    202: PENDING while the gateway decides."""
    app = current_payment_app()
    outcome = await payment_write(
        payment_id,
        CreateRefund,
        "/payments/{payment_id}/refunds",
        functools.partial(service.refund_payment, charging=app.charging),
    )
    if not outcome.replayed and outcome.status in (200, 202):
        app.metrics.refunds_created.inc()
    return answer_outcome(outcome, "/payments/{payment_id}/refunds")


@blueprint.post("/payments/<payment_id:payment_id>/settlement")
@requires(ANY_SCOPE)
@document_errors(401, 404, 410)
async def post_settlement(payment_id: int) -> Response:
    """Gone: payments settle from the gateway itself (its webhook, or the gateway worker asking
    it). An operator's manual decision is POST /admin/payments/{payment_id}/settlement."""
    await _drop_body()
    prefix = current_payment_app().settings.api_prefix
    raise APIError(
        410,
        "SETTLEMENT_MOVED",
        "This route is gone: payments settle from the payment gateway. An operator decides a "
        f"PENDING payment with POST {prefix}/admin/payments/{payment_id}/settlement "
        "(ADMIN_API_KEYS).",
        location=f"{prefix}/admin/payments/{payment_id}/settlement",
    )


M = TypeVar("M", CreateRefund, Settle)


async def payment_write(
    payment_id: int,
    model_type: type[M],
    route: str,
    operation: Callable[..., Awaitable[service.Outcome]],
) -> service.Outcome:
    """The shared shape of the writes on one payment: body, key, validation, then the operation."""
    data = await json_body()
    key = _idempotency_key(data)
    model = validate_model(model_type, data)
    guard = write_guard(key, route, {"payment_id": payment_id}, model)
    pool = current_payment_app().pool
    return await operation(pool, payment_id, model, guard=guard)


# -- read endpoints ------------------------------------------------------------------------------
@blueprint.get("/payments/<payment_id:payment_id>")
@requires("payments:read")
@document_response(PaymentWithRefunds, 200)
@document_errors(401, 404, 503)
async def get_payment(payment_id: int) -> Response:
    """A payment with its refunds."""
    async with current_payment_app().connection() as conn:
        body = await payments.select_payment_document(conn, payment_id=payment_id)
    if body is None:
        raise service.payment_not_found(payment_id)
    return Response(body, content_type=JSON)


@blueprint.get("/payments/<payment_id:payment_id>/refunds")
@requires("payments:read")
@document_response(RefundList, 200)
@document_errors(401, 404, 503)
async def get_refunds(payment_id: int) -> Response:
    """The refunds of a payment, oldest first."""
    async with current_payment_app().connection() as conn:
        body = await refunds.select_refunds_document(conn, payment_id=payment_id)
    if body is None:
        raise service.payment_not_found(payment_id)
    return Response(body, content_type=JSON)


@blueprint.get("/payments")
@requires("payments:read")
@document_querystring(ListQuery)
@document_response(PaymentList, 200)
@document_errors(400, 401, 503)
async def list_payments() -> Response:
    """Payments, newest first; filter by trip_id and status; page with starting_after."""
    query = validate_model(ListQuery, dict(request.args.items()))
    async with current_payment_app().connection() as conn:
        body = await payments.select_payments_page(
            conn,
            trip_id=query.trip_id,
            status=query.status,
            limit=query.limit,
            starting_after=query.starting_after,
        )
    return Response(body, content_type=JSON)
