"""The admin API: subscribed endpoints over HTTP, one event's deliveries, and an operator's
settlement of a PENDING payment.

Registered by `create_app` only when ADMIN_API_KEYS is set, under `{API_PREFIX}/admin`; without
it every /admin path answers 404, as if absent. Every route needs `Authorization: Bearer <admin
key>` (ADMIN_API_KEYS, separate from API_KEYS); anything else is 401. Handlers are thin: the
endpoint SQL is payment_service.endpoints (which the command line uses too; every change NOTIFYs
the relays), the deliveries query app.deliveries. A secret is shown only by POST /endpoints and
rotate-secret.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import asyncpg
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, model_validator
from quart import Blueprint, Response, g, request
from quart_schema import document_request, document_response
from werkzeug.routing import BaseConverter

from app import deliveries, service
from app.context import current_payment_app
from app.errors import APIError
from app.hooks import bearer_name, unauthorized
from app.models import Payment, Settle, validate_model
from app.routes import JSON, answer_outcome, document_errors, json_body, payment_write
from payment_service import endpoints
from payment_service.endpoints import Endpoint, EndpointError, EndpointExists, EndpointNotFound

blueprint = Blueprint("admin", __name__)

# What an endpoint may subscribe to, as the schema says it; payment_service.endpoints checks each
# value again (AfterValidator), so the API takes exactly what the command line takes.
EventTypePattern = Literal[
    "*",
    "payment.*",
    "payment.succeeded",
    "payment.pending",
    "payment.failed",
    "payment.refunded",
    "refund.*",
    "refund.failed",
]
Name = Annotated[
    str,
    Strict(),
    Field(pattern=endpoints.NAME_PATTERN.pattern),
    AfterValidator(endpoints.check_name),
]
# No spaces or control characters (PostgreSQL's text takes no NUL).
Url = Annotated[
    str,
    Strict(),
    Field(max_length=2000, pattern=r"^https?://[^\s/?#\x00-\x1f\x7f]+[^\s\x00-\x1f\x7f]*$"),
    AfterValidator(endpoints.check_url),
]
EventTypes = Annotated[list[EventTypePattern], Field(min_length=1, max_length=10)]
# `whsec_` + base64 of at least 24 bytes (Standard Webhooks).
Secret = Annotated[
    str,
    Strict(),
    Field(max_length=200, pattern=r"^whsec_[A-Za-z0-9+/]{32,}={0,2}$"),
    AfterValidator(endpoints.check_secret),
]


# -- request models -------------------------------------------------------------------------------
class CreateEndpoint(BaseModel):
    """A new endpoint; it receives the events written from now on. `secret` absent: generated;
    `event_types` absent: every type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    url: Url
    event_types: EventTypes = ["*"]
    secret: Secret | None = None


class UpdateEndpoint(BaseModel):
    """What is given changes; what is not stays."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"minProperties": 1})

    url: Url | None = None
    event_types: EventTypes | None = None

    @model_validator(mode="after")
    def _something(self) -> UpdateEndpoint:
        if self.url is None and self.event_types is None:
            raise ValueError("give url, event_types or both")
        return self


class RotateSecret(BaseModel):
    """`secret` absent: a new one is generated. Every secret it replaced in the last 24 hours
    still signs (three in all at most)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: Secret | None = None


# -- response documents (for /openapi.json) -------------------------------------------------------
class EndpointDocument(BaseModel):
    name: str
    url: str | None
    event_types: list[str]
    state: Literal["ACTIVE", "PAUSED", "DISABLED"]
    state_reason: str | None
    breaker: Literal["closed", "open", "half_open"]
    consecutive_failures: int
    signed: bool
    # When each replaced secret that still signs stops signing, newest first (never the secrets).
    previous_secrets_expire_at: list[datetime]
    failing_since: datetime | None
    last_success_at: datetime | None
    seeded: bool
    created_at: datetime
    updated_at: datetime


class EndpointWithSecret(EndpointDocument):
    secret: str


class EndpointList(BaseModel):
    data: list[EndpointDocument]


class EndpointRemoved(BaseModel):
    name: str
    removed: Literal[True]
    undelivered_removed: int


class DeliveryAttempt(BaseModel):
    model_config = ConfigDict(extra="allow")

    attempt: int
    at: datetime
    outcome: str
    status_code: int | None
    error: str | None
    duration_ms: int | None


class Delivery(BaseModel):
    endpoint: str
    status: Literal["PENDING", "DELIVERED", "DEAD"]
    attempts: int
    counted_attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    attempt_log: list[DeliveryAttempt]


class EventDeliveries(BaseModel):
    event_id: uuid.UUID
    event_type: str
    payment_id: int
    created_at: datetime
    deliveries: list[Delivery]


# -- plumbing -------------------------------------------------------------------------------------
class EndpointNameConverter(BaseConverter):
    """`<endpoint_name:…>`: a name as endpoints may have it; anything else is no resource (404)."""

    regex = endpoints.NAME_PATTERN.pattern.strip("^$")
    part_isolating = True


@blueprint.before_request
async def authenticate() -> None:
    keys = current_payment_app().settings.admin_api_keys
    name = bearer_name(request.headers.get("Authorization", ""), keys)
    if name is None:
        raise unauthorized("payment-service-admin")
    g.caller = f"admin:{name}"  # the access log's caller; never the token


@contextlib.asynccontextmanager
async def _endpoints() -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection for payment_service.endpoints, whose refusals become problems."""
    try:
        async with current_payment_app().connection() as conn:
            yield conn
    except EndpointNotFound as error:
        raise APIError(404, "ENDPOINT_NOT_FOUND", str(error)) from None
    except EndpointExists as error:
        raise APIError(409, "ENDPOINT_EXISTS", str(error)) from None
    except EndpointError as error:
        raise APIError(409, "ENDPOINT_CONFLICT", str(error)) from None


M = TypeVar("M", CreateEndpoint, UpdateEndpoint, RotateSecret)


async def _body(model: type[M]) -> M:
    return validate_model(model, await json_body())


def _without_body() -> bool:
    return not request.content_length and "Content-Type" not in request.headers


def _answer(document: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(document, ensure_ascii=False), status=status, content_type=JSON)


def _with_secret(endpoint: Endpoint, status: int) -> Response:
    """An endpoint with its (new) secret: the answer of POST /endpoints and rotate-secret only."""
    return _answer({**endpoint.public(), "secret": endpoint.secret}, status)


# -- endpoints ------------------------------------------------------------------------------------
@blueprint.get("/endpoints")
@document_response(EndpointList, 200)
@document_errors(401, 503)
async def get_endpoints() -> Response:
    """Every subscribed endpoint, by name (no secrets)."""
    async with _endpoints() as conn:
        found = await endpoints.select_endpoints(conn)
    return _answer({"data": [endpoint.public() for endpoint in found]})


@blueprint.post("/endpoints")
@document_request(CreateEndpoint)
@document_response(EndpointWithSecret, 201)
@document_errors(400, 401, 409, 413, 415, 503)
async def post_endpoint() -> Response:
    """Add an endpoint. Its answer is the only one, besides rotate-secret, showing the secret."""
    model = await _body(CreateEndpoint)
    async with _endpoints() as conn:
        added = await endpoints.insert_endpoint(
            conn,
            name=model.name,
            url=model.url,
            event_types=tuple(model.event_types),
            secret=model.secret,
        )
    return _with_secret(added, 201)


@blueprint.get("/endpoints/<endpoint_name:name>")
@document_response(EndpointDocument, 200)
@document_errors(401, 404, 503)
async def get_endpoint(name: str) -> Response:
    """One endpoint (no secrets)."""
    async with _endpoints() as conn:
        endpoint = await endpoints.select_endpoint(conn, name)
    return _answer(endpoint.public())


@blueprint.patch("/endpoints/<endpoint_name:name>")
@document_request(UpdateEndpoint)
@document_response(EndpointDocument, 200)
@document_errors(400, 401, 404, 413, 415, 503)
async def patch_endpoint(name: str) -> Response:
    """Change an endpoint's URL and/or event types; it is no longer what seeding made it."""
    model = await _body(UpdateEndpoint)
    async with _endpoints() as conn:
        changed = await endpoints.update_endpoint(
            conn,
            name,
            url=model.url,
            event_types=tuple(model.event_types) if model.event_types is not None else None,
        )
    return _answer(changed.public())


@blueprint.delete("/endpoints/<endpoint_name:name>")
@document_response(EndpointRemoved, 200)
@document_errors(401, 404, 503)
async def delete_endpoint(name: str) -> Response:
    """Remove an endpoint with its deliveries (the undelivered ones are counted in the answer)."""
    async with _endpoints() as conn:
        undelivered = await endpoints.delete_endpoint(conn, name)
    return _answer({"name": name, "removed": True, "undelivered_removed": undelivered})


# State changes by hand: (route, state, the endpoint's state_reason, the operation's summary).
STATE_CHANGES = (
    (
        "pause",
        "PAUSED",
        "paused by {caller}",
        "Hold the endpoint's deliveries until resume; its new events still get deliveries.",
    ),
    ("resume", "ACTIVE", None, "Deliver again, in order, what the endpoint held while paused."),
    (
        "disable",
        "DISABLED",
        "disabled by {caller}",
        "Hold the endpoint's deliveries until enable; its new events get none (outbox replay "
        "backfills them).",
    ),
    (
        "enable",
        "ACTIVE",
        None,
        "Deliver again, in order, what the endpoint held; the breaker closes.",
    ),
)


def _state_route(action: str, state: str, reason: str | None, summary: str) -> None:
    async def change_state(name: str) -> Response:
        async with _endpoints() as conn:
            changed = await endpoints.set_state(
                conn, name, state, reason=reason.format(caller=g.caller) if reason else None
            )
        return _answer(changed.public())

    change_state.__name__ = f"post_endpoint_{action}"
    change_state.__doc__ = summary
    view = document_errors(401, 404, 503)(document_response(EndpointDocument, 200)(change_state))
    blueprint.post(f"/endpoints/<endpoint_name:name>/{action}")(view)


for _change in STATE_CHANGES:
    _state_route(*_change)


@blueprint.post("/endpoints/<endpoint_name:name>/rotate-secret")
@document_request(RotateSecret)
@document_response(EndpointWithSecret, 200)
@document_errors(400, 401, 404, 413, 415, 503)
async def post_rotate_secret(name: str) -> Response:
    """A new signing secret (sent without a body: generated); callbacks carry a signature with
    each secret it replaced in the last 24 hours too (three at most in all). The answer shows the
    new secret."""
    model = RotateSecret() if _without_body() else await _body(RotateSecret)
    async with _endpoints() as conn:
        rotated = await endpoints.rotate_secret(conn, name, secret=model.secret)
    return _with_secret(rotated, 200)


# -- deliveries -----------------------------------------------------------------------------------
@blueprint.get("/events/<uuid:event_id>/deliveries")
@document_response(EventDeliveries, 200)
@document_errors(401, 404, 503)
async def get_event_deliveries(event_id: uuid.UUID) -> Response:
    """An event (its `event_id` is the callbacks' webhook-id) and its delivery to each endpoint,
    with every attempt: time, outcome, status code, error, duration."""
    async with current_payment_app().connection() as conn:
        body = await deliveries.select_event_deliveries(conn, event_id=event_id)
    if body is None:
        raise APIError(404, "EVENT_NOT_FOUND", f"No event has the event_id {event_id}.")
    return Response(body, content_type=JSON)


# -- payments -------------------------------------------------------------------------------------
@blueprint.post("/payments/<payment_id:payment_id>/settlement")
@document_request(Settle)
@document_response(Payment, 200)
@document_errors(400, 401, 404, 409, 413, 415, 422, 503)
async def post_payment_settlement(payment_id: int) -> Response:
    """An operator's decision on a PENDING payment: SUCCESS or FAILED (409 PAYMENT_NOT_PENDING
    otherwise; 409 GATEWAY_CALL_IN_PROGRESS while a call to the gateway for it may be in
    flight). Idempotent by its idempotency_key, scoped to the admin key's name. The payment's
    charge waiting at the gateway, if any, is closed: check what the gateway holds first
    (`payment-service gateway review`)."""
    route = "/admin/payments/{payment_id}/settlement"
    outcome = await payment_write(payment_id, Settle, route, service.settle_payment)
    return answer_outcome(outcome, route)
