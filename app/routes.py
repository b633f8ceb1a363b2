"""HTTP handlers: parse → call one service function → answer. No SQL here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from quart import Blueprint, Response, g, request
from quart_schema import document_querystring, document_request, document_response

from app import payments, refunds, service
from app.context import current_payment_app
from app.errors import PROBLEM_CONTENT_TYPE, APIError
from app.idempotency import Guard, IdempotencyKey, fingerprint, request_path
from app.models import (
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
    parse_json_object,
    validate_model,
)
from app.models import Payment as PaymentDocument

JSON = "application/json"
ERRORS_POST = (400, 401, 409, 413, 415, 422, 503)

blueprint = Blueprint("payments", __name__)


F = TypeVar("F", bound=Callable[..., Any])


def _document_errors(*statuses: int) -> Callable[[F], F]:
    def decorator(func: F) -> F:
        for status in statuses:
            func = document_response(Problem, status)(func)
        return func

    return decorator


# -- request plumbing ----------------------------------------------------------------------------
async def _json_body() -> dict[str, Any]:
    mimetype = request.mimetype
    if mimetype != JSON and not (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    ):
        raise APIError(415, "UNSUPPORTED_MEDIA_TYPE", "Send the body as application/json.")
    raw = await request.get_data(as_text=False)
    assert isinstance(raw, bytes)
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, "PAYLOAD_TOO_LARGE", f"The body is larger than {MAX_BODY_BYTES} bytes.")
    return parse_json_object(raw)


def _idempotency_key(data: dict[str, Any]) -> str:
    """The key from the body or the Idempotency-Key header (validated with the body model)."""
    header = request.headers.get("Idempotency-Key")
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


def _guard(key: str, route: str, params: dict[str, Any], model: Any) -> Guard:
    app = current_payment_app()
    body = model.model_dump(mode="json", exclude={"idempotency_key"}, exclude_none=True)
    return Guard(
        key=IdempotencyKey.from_key(key, g.caller),  # the scope: set by the auth hook
        path=request_path("POST", route),
        fingerprint=fingerprint("POST", route, params, body),
        ttl_seconds=app.settings.idempotency_key_ttl,
    )


def _answer(outcome: service.Outcome, route: str) -> Response:
    app = current_payment_app()
    response = Response(
        outcome.body,
        status=outcome.status,
        content_type=JSON if outcome.status < 400 else PROBLEM_CONTENT_TYPE,
    )
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
        app.metrics.replays.labels(route).inc()
    elif outcome.status < 300:
        app.notifier.poke()  # every successful write committed an outbox event
    return response


def _check_id(payment_id: int) -> int:
    if payment_id > INT64_MAX:
        raise service.payment_not_found(payment_id)
    return payment_id


# -- write endpoints -----------------------------------------------------------------------------
@blueprint.post("/payments")
@document_request(CreatePayment)
@document_response(PaymentDocument, 200)
@document_response(PendingPayment, 202)
@_document_errors(*ERRORS_POST)
async def post_payment() -> Response:
    """Charge a trip. Safe to retry with the same idempotency key."""
    app = current_payment_app()
    settings = app.settings
    data = await _json_body()
    key = _idempotency_key(data)
    model = validate_model(CreatePayment, data, max_amount=settings.max_payment_amount)
    currency = model.currency or settings.default_currency
    guard = _guard(key, "/payments", {}, model.model_copy(update={"currency": currency}))
    outcome = await service.create_payment(
        app.pool,
        model,
        guard=guard,
        currency=currency,
        asynchronous=model.method in settings.async_methods,
    )
    if not outcome.replayed and outcome.status < 300:
        app.metrics.payments_created.labels("PENDING" if outcome.status == 202 else "SUCCESS").inc()
    return _answer(outcome, "/payments")


@blueprint.post("/payments/<int:payment_id>/refunds")
@document_request(CreateRefund)
@document_response(RefundResult, 200)
@_document_errors(404, *ERRORS_POST)
async def post_refund(payment_id: int) -> Response:
    """Refund all or part of a payment. Several partial refunds may add up to the amount."""
    app = current_payment_app()
    outcome = await _payment_write(
        payment_id, CreateRefund, "/payments/{payment_id}/refunds", service.refund_payment
    )
    if not outcome.replayed and outcome.status == 200:
        app.metrics.refunds_created.inc()
    return _answer(outcome, "/payments/{payment_id}/refunds")


@blueprint.post("/payments/<int:payment_id>/settlement")
@document_request(Settle)
@document_response(PaymentDocument, 200)
@_document_errors(404, *ERRORS_POST)
async def post_settlement(payment_id: int) -> Response:
    """Settle an asynchronous (PENDING) payment with the gateway's verdict."""
    route = "/payments/{payment_id}/settlement"
    return _answer(await _payment_write(payment_id, Settle, route, service.settle_payment), route)


M = TypeVar("M", CreateRefund, Settle)


async def _payment_write(
    payment_id: int,
    model_type: type[M],
    route: str,
    operation: Callable[..., Awaitable[service.Outcome]],
) -> service.Outcome:
    """The shared shape of the writes on one payment: body, key, validation, then the operation."""
    data = await _json_body()
    key = _idempotency_key(data)
    model = validate_model(model_type, data)
    guard = _guard(key, route, {"payment_id": payment_id}, model)
    pool = current_payment_app().pool
    return await operation(pool, _check_id(payment_id), model, guard=guard)


# -- read endpoints ------------------------------------------------------------------------------
@blueprint.get("/payments/<int:payment_id>")
@document_response(PaymentWithRefunds, 200)
@_document_errors(401, 404, 503)
async def get_payment(payment_id: int) -> Response:
    """A payment with its refunds."""
    async with current_payment_app().connection() as conn:
        body = await payments.select_payment_document(conn, payment_id=_check_id(payment_id))
    if body is None:
        raise service.payment_not_found(payment_id)
    return Response(body, content_type=JSON)


@blueprint.get("/payments/<int:payment_id>/refunds")
@document_response(RefundList, 200)
@_document_errors(401, 404, 503)
async def get_refunds(payment_id: int) -> Response:
    """The refunds of a payment, oldest first."""
    async with current_payment_app().connection() as conn:
        body = await refunds.select_refunds_document(conn, payment_id=_check_id(payment_id))
    if body is None:
        raise service.payment_not_found(payment_id)
    return Response(body, content_type=JSON)


@blueprint.get("/payments")
@document_querystring(ListQuery)
@document_response(PaymentList, 200)
@_document_errors(400, 401, 503)
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
