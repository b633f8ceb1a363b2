"""The payment gateway's webhook: `POST {API_PREFIX}/gateway/stripe/webhook`.

Open to the network (the gateway calls it; no API key): what makes a call genuine is its
signature, verified by the gateway's adapter against STRIPE_WEBHOOK_SECRET. A bad, missing or
stale signature is 400 and nothing is stored. A genuine event is stored once and applied
forward-only (payment_service.money.webhooks); a repeat answers 200 and changes nothing. When the
gateway must be asked about the event and cannot be, the answer is 503: nothing is stored, and
the gateway sends the event again. Registered only when a gateway is configured.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel
from quart import Blueprint, Response, request
from quart_schema import document_request, document_response

from app.context import current_payment_app
from app.errors import APIError
from app.models import Problem
from app.routes import JSON, BodyTooLarge, document_errors
from payment_service.gateway.interface import GatewayOutcomeUnknown, WebhookRejected
from payment_service.money.webhooks import APPLIED, apply_event

PATH = "/gateway/stripe/webhook"
MAX_WEBHOOK_BYTES = 512 * 1024  # the gateway's events are a few KiB
RETRY_AFTER_SECONDS = "5"

blueprint = Blueprint("gateway_webhook", __name__)

# For the OpenAPI document: what makes a call genuine.
SIGNATURE_HEADER = {
    "name": "Stripe-Signature",
    "in": "header",
    "required": True,
    "description": (
        "The gateway's signature of the body (t=<timestamp>,v1=<HMAC-SHA256>), verified against "
        "STRIPE_WEBHOOK_SECRET; a bad, missing or stale (over 5 minutes) one is 400 "
        "WEBHOOK_REJECTED."
    ),
    "schema": {"type": "string"},
}


class GatewayEventBody(BaseModel):
    """An event of the gateway, in its own format (Stripe's event object), signed in the
    Stripe-Signature header."""

    model_config = {"extra": "allow"}

    id: str
    type: str


class WebhookReceived(BaseModel):
    received: Literal[True]
    # applied | final_already | not_ours | not_final | ignored | duplicate
    outcome: str
    payment_id: int | None = None


@blueprint.post(PATH)
@document_request(GatewayEventBody)
@document_response(WebhookReceived, 200)
@document_response(Problem, 400)
@document_errors(413, 503)
async def post_gateway_webhook() -> Response:
    """The gateway's events (its signature is checked; no API key)."""
    app = current_payment_app()
    assert app.charging is not None
    body = await _raw_body()
    try:
        event = app.charging.gateway.parse_webhook(body, dict(request.headers))
    except WebhookRejected as rejected:
        raise APIError(400, "WEBHOOK_REJECTED", str(rejected)) from None
    try:
        applied = await apply_event(app.pool, app.charging.gateway, event)
    except GatewayOutcomeUnknown as unknown:
        raise APIError(
            503,
            "GATEWAY_UNAVAILABLE",
            f"The gateway could not be asked about this event ({unknown.reason}); send it again.",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        ) from None
    if applied.outcome == APPLIED:
        app.notifier.poke()  # the change's outbox event is committed
    document: dict[str, Any] = {"received": True, "outcome": applied.outcome}
    if applied.payment_id is not None:
        document["payment_id"] = applied.payment_id
    return Response(json.dumps(document), content_type=JSON)


async def _raw_body() -> bytes:
    """The body as sent (the signature covers its exact bytes), up to MAX_WEBHOOK_BYTES."""
    body = request.body
    if (request.content_length or 0) > MAX_WEBHOOK_BYTES:
        raise BodyTooLarge(body, MAX_WEBHOOK_BYTES)
    parts: list[bytes] = []
    size = 0
    async for chunk in body:
        size += len(chunk)
        if size > MAX_WEBHOOK_BYTES:
            raise BodyTooLarge(body, MAX_WEBHOOK_BYTES)
        parts.append(chunk)
    return b"".join(parts)
