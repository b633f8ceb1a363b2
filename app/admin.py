"""The admin API: subscribed endpoints over HTTP, one event's deliveries, replays, the audit
log, and an operator's settlement of a PENDING payment.

Registered by `create_app` only when ADMIN_API_KEYS is set, under `{API_PREFIX}/admin`; without
it every /admin path answers 404, as if absent. Every route needs `Authorization: Bearer <admin
key>` (ADMIN_API_KEYS, separate from API_KEYS); anything else is 401. Handlers are thin: the
endpoints' SQL is payment_service.endpoints (every change NOTIFYs the relays and writes the
change's audit row, naming the admin key as `admin:<name>` and the client's address), the
deliveries' payment_service.deliveries, the audit log's payment_service.audit; the command line
uses them too. A secret is shown only by POST /endpoints and rotate-secret.
"""

from __future__ import annotations

import contextlib
import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import asyncpg
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    WithJsonSchema,
    model_validator,
)
from quart import Blueprint, Response, g, request
from quart_schema import document_querystring, document_request, document_response
from werkzeug.routing import BaseConverter

from app import service
from app.context import current_payment_app
from app.errors import APIError, validation_error
from app.hooks import bearer_name, unauthorized
from app.models import INT64_MAX, Payment, Settle, validate_model
from app.routes import JSON, answer_outcome, document_errors, json_body, payment_write
from payment_service import audit, deliveries, endpoints
from payment_service.audit import Operator
from payment_service.callback_urls import MAX_URL_LENGTH
from payment_service.endpoints import (
    Endpoint,
    EndpointError,
    EndpointExists,
    EndpointNotFound,
    InvalidEndpoint,
)
from payment_service.vocabulary import (
    EVENT_TYPES,
    MAX_EVENT_TYPES,
    DeliveryStatus,
    EndpointState,
)

blueprint = Blueprint("admin", __name__)
# The `payment.*`-style prefixes of the event types (`refund.*` too).
EVENT_PREFIXES = sorted({event_type.split(".")[0] + ".*" for event_type in EVENT_TYPES})

# What endpoints may have is checked once, by payment_service.endpoints (which the command line
# uses too): each type below hands a string or list to that check (AfterValidator), with a schema
# that says what the check enforces (WithJsonSchema, for /openapi.json).
# What the URL check takes, as nearly as a pattern says it: a DNS name, an IPv4 address or an
# IPv6 one in brackets; a port from 1 to 65535; a path and query in visible ASCII but `#`.
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
URL_PATTERN = (
    rf"^https?://({_LABEL}(\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]+\])(:{_PORT})?"
    r"([/?][\x21\x22\x24-\x7e]*)?$"
)
Name = Annotated[
    str,
    Strict(),
    WithJsonSchema({"type": "string", "pattern": endpoints.NAME_PATTERN.pattern, "maxLength": 63}),
    AfterValidator(endpoints.check_name),
]
Url = Annotated[
    str,
    Strict(),
    WithJsonSchema(
        {
            "type": "string",
            "format": "uri",
            "maxLength": MAX_URL_LENGTH,
            "pattern": URL_PATTERN,
            "description": "http(s)://host[:port]/path, or an IP address as the host (IPv6 in "
            "[brackets]): no credentials, no fragment, the path in ASCII (percent-encode the "
            "rest). In production a host written as a loopback, link-local, unspecified or "
            "multicast address is refused unless ENDPOINT_ALLOWED_NETWORKS lists it.",
        }
    ),
    AfterValidator(endpoints.check_url),
]
EventTypes = Annotated[
    list[Annotated[str, Strict()]],
    WithJsonSchema(
        {
            "type": "array",
            "items": {"enum": ["*", *EVENT_PREFIXES, *EVENT_TYPES]},
            "minItems": 1,
            "maxItems": MAX_EVENT_TYPES,
        }
    ),
    AfterValidator(endpoints.check_event_types),
]
# `whsec_` + base64 of at least 24 bytes (Standard Webhooks).
Secret = Annotated[
    str,
    Strict(),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^whsec_[A-Za-z0-9+/]{32,}={0,2}$",
            "maxLength": endpoints.MAX_SECRET_LENGTH,
        }
    ),
    AfterValidator(endpoints.check_secret),
]
Reason = Annotated[
    str,
    Strict(),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^[^\x00-\x1f\x7f-\x9f]*$",
            "maxLength": endpoints.MAX_REASON_LENGTH,
        }
    ),
    AfterValidator(endpoints.check_reason),
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


class StateReason(BaseModel):
    """Why (shown with the endpoint); absent: the answer names who did it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: Reason | None = None


class ReplayDead(BaseModel):
    """Which dead deliveries go back in line: to `endpoint` and/or of the event `event_id` (its
    webhook-id); neither: every dead delivery. `reason` goes to the audit log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: Name | None = None
    event_id: uuid.UUID | None = None
    reason: Reason | None = None


class ReplayRange(BaseModel):
    """The events to send the endpoint again: those of its types created at or after `since`
    and before `until` (absent: up to now), ISO 8601 with an offset; an `until` not after
    `since` is an empty range. `reason` goes to the audit log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    since: AwareDatetime
    until: AwareDatetime | None = None
    reason: Reason | None = None


class RangeQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    since: AwareDatetime
    until: AwareDatetime | None = None


class DeadQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: Name | None = None


class RotateSecret(BaseModel):
    """`secret` absent: a new one is generated. Every secret it replaced in the last 24 hours
    still signs (three in all at most)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: Secret | None = None


# Text that a filter compares: one line, no control characters (PostgreSQL text holds no NUL).
FilterText = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


class AuditQuery(BaseModel):
    """Filters of GET /audit (all optional): a time range (ISO 8601 with an offset; `since`
    inclusive, `until` exclusive), who (`admin:ops`, `console:ops`, `cli:alice`), what
    (`endpoint.pause`, or `endpoint.*`), on what (`endpoint:trip`, or `trip`); `starting_after`:
    the `audit_id` of the last entry of the previous page."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    actor: FilterText | None = None
    action: Annotated[str, Field(max_length=100, pattern=r"^[a-z]+(\.[a-z_]+)*(\.\*)?$")] | None = (
        None
    )
    target: FilterText | None = None
    limit: Annotated[int, Field(ge=1, le=audit.MAX_PAGE)] = 20
    starting_after: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None


# -- response documents (for /openapi.json) -------------------------------------------------------
class EndpointDocument(BaseModel):
    name: str
    url: str | None
    event_types: list[str]
    state: EndpointState
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


class Gap(BaseModel):
    """What a DISABLED endpoint missed: events of its types written since, without a delivery
    to it; `replay_command` sends them."""

    disabled_at: datetime
    missed_events: int
    replay_command: str


class EnabledEndpoint(EndpointDocument):
    gap: Gap | None


class EndpointList(BaseModel):
    data: list[EndpointDocument]


class EndpointRemoved(BaseModel):
    name: str
    removed: Literal[True]
    undelivered_removed: int  # pending and dead deliveries, deleted with it
    delivered_kept: int  # its delivered deliveries, kept as history until retention


class AuditTarget(BaseModel):
    kind: str  # endpoint, payment, deliveries, …
    id: str


class AuditEntry(BaseModel):
    audit_id: int
    at: datetime
    actor: str  # admin:<key name>, console:<key name>, cli:<user>
    action: str  # endpoint.add, endpoint.pause, endpoint.rotate_secret, …
    target: AuditTarget
    origin: str  # the client's address, or cli@<host>
    reason: str | None
    before: dict[str, Any] | None  # the fields that changed, as they were (never a secret)
    after: dict[str, Any] | None  # … and as they became


class AuditList(BaseModel):
    data: list[AuditEntry]
    has_more: bool


class DeadToReplay(BaseModel):
    endpoint: str
    state: EndpointState  # only ACTIVE sends them at once
    dead: int


class DeadPreviewDocument(BaseModel):
    data: list[DeadToReplay]


class DeadReplayed(BaseModel):
    replayed: int
    to: dict[str, int]  # replayed deliveries per endpoint
    # Replayed deliveries older than an event of the same payment their endpoint already got.
    superseded: int


class RangeReplayDocument(BaseModel):
    endpoint: str
    added: int  # events it never had a delivery of
    again: int  # events sent or tried before, sent again
    state: EndpointState  # only ACTIVE sends them at once


class DeliveryAttempt(BaseModel):
    model_config = ConfigDict(extra="allow")

    attempt: int
    at: datetime
    outcome: str
    status_code: int | None
    error: str | None
    duration_ms: int | None
    # The fingerprints (start of the SHA-256) of the keys that signed it, newest secret first,
    # space-separated; null: unsigned, or recorded before the relay noted it.
    signed_with: str | None = None


class Delivery(BaseModel):
    endpoint: str
    endpoint_removed: bool  # the endpoint was removed since; its delivered deliveries stay
    status: DeliveryStatus
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
    g.operator = Operator.admin_key(name, request.remote_addr)  # who the audit log names


def _operator() -> Operator:
    operator: Operator = g.operator
    return operator


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
    except InvalidEndpoint as error:  # a check that needs the settings (where callbacks may go)
        raise validation_error([{"field": error.field, "message": str(error)}]) from None
    except EndpointError as error:
        raise APIError(409, "ENDPOINT_CONFLICT", str(error)) from None


M = TypeVar("M", CreateEndpoint, UpdateEndpoint, RotateSecret, StateReason, ReplayDead, ReplayRange)


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
            networks=current_payment_app().settings.callback_networks,
            operator=_operator(),
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
            networks=current_payment_app().settings.callback_networks,
            operator=_operator(),
        )
    return _answer(changed.public())


@blueprint.delete("/endpoints/<endpoint_name:name>")
@document_response(EndpointRemoved, 200)
@document_errors(401, 404, 503)
async def delete_endpoint(name: str) -> Response:
    """Remove an endpoint. Its undelivered deliveries (pending, dead) go with it; its delivered
    ones stay as history (GET /events/{event_id}/deliveries shows them) until retention."""
    async with _endpoints() as conn:
        removed = await endpoints.delete_endpoint(conn, name, operator=_operator())
    return _answer(
        {
            "name": name,
            "removed": True,
            "undelivered_removed": removed.undelivered,
            "delivered_kept": removed.delivered,
        }
    )


# Pause and disable take an optional body `{"reason": …}`; without one, the reason names the
# caller. (route, the change, the verb of the default reason, the operation's summary)
HOLDS = (
    (
        "pause",
        endpoints.pause,
        "paused",
        "Hold the endpoint's deliveries until resume; its new events still get deliveries. An "
        'optional body `{"reason": …}` says why (shown with the endpoint).',
    ),
    (
        "disable",
        endpoints.disable,
        "disabled",
        "Hold the endpoint's deliveries until enable; its new events get none (enable names "
        'them, and `outbox replay --since` sends them). An optional body `{"reason": …}` says '
        "why.",
    ),
)


def _hold_route(
    action: str, change: Callable[..., Awaitable[Endpoint]], verb: str, summary: str
) -> None:
    async def hold(name: str) -> Response:
        model = StateReason() if _without_body() else await _body(StateReason)
        reason = model.reason if model.reason is not None else f"{verb} by {g.caller}"
        async with _endpoints() as conn:
            changed = await change(conn, name, reason=reason, operator=_operator())
        return _answer(changed.public())

    hold.__name__ = f"post_endpoint_{action}"
    hold.__doc__ = summary
    view = document_request(StateReason)(hold)
    view = document_errors(400, 401, 404, 413, 415, 503)(
        document_response(EndpointDocument, 200)(view)
    )
    blueprint.post(f"/endpoints/<endpoint_name:name>/{action}")(view)


for _hold in HOLDS:
    _hold_route(*_hold)


@blueprint.post("/endpoints/<endpoint_name:name>/resume")
@document_response(EndpointDocument, 200)
@document_errors(401, 404, 409, 503)
async def post_endpoint_resume(name: str) -> Response:
    """Deliver again, in order, what the endpoint held while paused. A DISABLED endpoint is
    refused (409): enable it, which names the events it missed."""
    async with _endpoints() as conn:
        changed = await endpoints.resume(conn, name, operator=_operator())
    return _answer(changed.public())


@blueprint.post("/endpoints/<endpoint_name:name>/enable")
@document_response(EnabledEndpoint, 200)
@document_errors(401, 404, 503)
async def post_endpoint_enable(name: str) -> Response:
    """Deliver again, in order, what the endpoint held; the breaker closes. After DISABLED,
    `gap` says when it was disabled, how many events it missed since, and the command that
    sends them; otherwise `gap` is null."""
    async with _endpoints() as conn:
        enabled, gap = await endpoints.enable(conn, name, operator=_operator())
    return _answer({**enabled.public(), "gap": None if gap is None else gap.public()})


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
        rotated = await endpoints.rotate_secret(
            conn, name, secret=model.secret, operator=_operator()
        )
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


# -- replays ---------------------------------------------------------------------------------------
@blueprint.get("/deliveries/dead")
@document_querystring(DeadQuery)
@document_response(DeadPreviewDocument, 200)
@document_errors(400, 401, 404, 503)
async def get_dead_to_replay() -> Response:
    """How many dead deliveries there are per endpoint (to `endpoint`, or every one): what
    POST /deliveries/replay-dead would put back in line now."""
    query = validate_model(DeadQuery, dict(request.args.items()))
    async with _endpoints() as conn:
        found = await deliveries.preview_dead(conn, endpoint=query.endpoint)
    return _answer({"data": [asdict(preview) for preview in found]})


@blueprint.post("/deliveries/replay-dead")
@document_request(ReplayDead)
@document_response(DeadReplayed, 200)
@document_errors(400, 401, 404, 413, 415, 503)
async def post_replay_dead() -> Response:
    """Put dead deliveries back in line, due now, with fresh counters (to `endpoint`, of one
    event, or all of them; sent without a body: all). Recorded in the audit log."""
    model = ReplayDead() if _without_body() else await _body(ReplayDead)
    async with _endpoints() as conn:
        done = await deliveries.replay_dead(
            conn,
            event_id=model.event_id,
            endpoint=model.endpoint,
            operator=_operator(),
            reason=model.reason,
        )
    to: dict[str, int] = {}
    for replayed in done.replayed:
        to[replayed.endpoint] = to.get(replayed.endpoint, 0) + 1
    return _answer({"replayed": len(done.replayed), "to": to, "superseded": len(done.superseded)})


@blueprint.get("/endpoints/<endpoint_name:name>/replay")
@document_querystring(RangeQuery)
@document_response(RangeReplayDocument, 200)
@document_errors(400, 401, 404, 503)
async def get_range_to_replay(name: str) -> Response:
    """What POST /endpoints/{name}/replay would send the endpoint now: the events of its types
    created in [since, until), those it never had and those it would get again."""
    query = validate_model(RangeQuery, dict(request.args.items()))
    async with _endpoints() as conn:
        preview = await deliveries.preview_range(
            conn, endpoint=name, since=query.since, until=query.until
        )
    return _answer({"endpoint": name, **asdict(preview)})


@blueprint.post("/endpoints/<endpoint_name:name>/replay")
@document_request(ReplayRange)
@document_response(RangeReplayDocument, 200)
@document_errors(400, 401, 404, 413, 415, 503)
async def post_replay_range(name: str) -> Response:
    """Send the endpoint every event of its types created in [since, until) again, with the
    same webhook-id: received ones too, and ones it never had (created before it subscribed, or
    while it was DISABLED). A PAUSED or DISABLED endpoint gets them once resumed or enabled.
    Recorded in the audit log."""
    model = await _body(ReplayRange)
    async with _endpoints() as conn:
        done = await deliveries.replay_range(
            conn,
            endpoint=name,
            since=model.since,
            until=model.until,
            operator=_operator(),
            reason=model.reason,
        )
    return _answer({"endpoint": name, **asdict(done)})


# -- the audit log --------------------------------------------------------------------------------
@blueprint.get("/audit")
@document_querystring(AuditQuery)
@document_response(AuditList, 200)
@document_errors(400, 401, 503)
async def get_audit() -> Response:
    """Operator actions from the command line, the admin API and the console, newest first:
    who, what, on what, when, from where, the fields that changed and the reason. Page with
    `starting_after` (the last entry's `audit_id`) while `has_more`."""
    query = validate_model(AuditQuery, dict(request.args.items()))
    async with current_payment_app().connection() as conn:
        page = await audit.select_audit(
            conn,
            since=query.since,
            until=query.until,
            actor=query.actor,
            action=query.action,
            target=query.target,
            limit=query.limit,
            before_id=query.starting_after,
        )
    return _answer({"data": [entry.public() for entry in page.entries], "has_more": page.has_more})


# -- payments -------------------------------------------------------------------------------------
# The settlement's route (its keys' request path), shared with the console's review decision.
SETTLEMENT_ROUTE = "/admin/payments/{payment_id}/settlement"


@blueprint.post("/payments/<payment_id:payment_id>/settlement")
@document_request(Settle)
@document_response(Payment, 200)
@document_errors(400, 401, 404, 409, 413, 415, 422, 503)
async def post_payment_settlement(payment_id: int) -> Response:
    """An operator's decision on a PENDING payment: SUCCESS or FAILED (409 PAYMENT_NOT_PENDING
    otherwise; 409 GATEWAY_CALL_IN_PROGRESS while a call to the gateway for it may be in
    flight). Idempotent by its idempotency_key, scoped to the admin key's name. Recorded in the
    audit log (`payment.settle`, with `reason` if given). The payment's charge waiting at the
    gateway, if any, is closed: check what the gateway holds first (`payment-service gateway
    review`, or the console's gateway review page)."""
    settle = functools.partial(service.settle_payment, operator=_operator())
    outcome = await payment_write(payment_id, Settle, SETTLEMENT_ROUTE, settle)
    return answer_outcome(outcome, SETTLEMENT_ROUTE)
