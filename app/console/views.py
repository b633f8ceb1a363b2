"""The console's pages and actions: thin handlers over the core (payment_service.endpoints,
payment_service.audit), rendered with Quart's templates (Jinja2, autoescaped: every value from
outside shows as text).

Pages are GETs; every change is a POST that carries the session's CSRF token, asked for on a
confirmation page first, made by the core function that writes its audit row (actor
`console:<admin key name>`, origin the client's address), then answered with a redirect to the
page that shows the result (a reload never repeats it) — except a new secret, shown once on the
answer of the POST itself and never again.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from quart import Blueprint, Response, g, render_template, request, url_for
from werkzeug.datastructures import MultiDict

from app import payments, service
from app.admin import SETTLEMENT_ROUTE
from app.console.reconciliation import Reconciliation, last_reconciliation
from app.console.session import COOKIE, CSRF_FIELD, IDLE_SECONDS, ConsoleSession, Sessions
from app.context import current_payment_app
from app.errors import APIError
from app.hooks import key_of_token
from app.routes import write_guard
from payment_service import audit, deliveries, endpoints
from payment_service.audit import Operator
from payment_service.endpoints import Endpoint, EndpointError, EndpointNotFound
from payment_service.money import history, review

logger = logging.getLogger(__name__)

blueprint = Blueprint(
    "console",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

SESSIONS = "payment_service.console.sessions"  # app.extensions' key
# Nothing but the service's own files: no third-party script, style, frame or form target.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
)
AUDIT_PAGE = 25  # entries per page of the audit log
ENDPOINT_HISTORY = 10  # operator actions shown on an endpoint's page
ENDPOINT_DELIVERIES = 10  # deliveries shown in each of an endpoint's lists
OPEN_ROUTES = frozenset({"console.sign_in", "console.post_sign_in", "console.static"})


def sessions() -> Sessions:
    found: Sessions = current_payment_app().extensions[SESSIONS]
    return found


def _session() -> ConsoleSession:
    session: ConsoleSession = g.console_session
    return session


def _operator() -> Operator:
    return Operator.console(_session().key_name, request.remote_addr)


def _secure() -> bool:
    """Secure cookies over https, and always in production (no admin session in clear text)."""
    return request.scheme == "https" or current_payment_app().settings.environment == "production"


def _set_cookie(response: Response, value: str, *, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=max_age,
        path=url_for("console.overview").rstrip("/") or "/",
        secure=_secure(),
        httponly=True,
        samesite="Strict",
    )


def _redirect(location: str) -> Response:
    """303 See Other to a path of ours (never built from the Host header)."""
    return Response("", status=303, headers={"Location": location})


async def _page(template: str, status: int = 200, **context: Any) -> Response:
    body = await render_template(f"console/{template}", **context)
    return Response(body, status=status, content_type="text/html; charset=utf-8")


async def _refused(status: int, message: str) -> Response:
    return await _page("refused.html", status, message=message)


# -- around every request -------------------------------------------------------------------------
@blueprint.before_request
async def require_session() -> Response | None:
    """Pages without a valid session go to the sign-in page; actions are refused (403), as is
    an action without the session's CSRF token."""
    g.console_session = None
    if request.endpoint in OPEN_ROUTES:
        return None
    session = sessions().load(request.cookies.get(COOKIE), now=time.time())
    if session is None:
        if request.method in ("GET", "HEAD"):
            return _redirect(url_for("console.sign_in"))
        return await _refused(403, "Not signed in (or the session ended): sign in again.")
    if request.method == "POST":
        form = await request.form
        if not session.csrf_matches(form.get(CSRF_FIELD, "")):
            return await _refused(403, "This form is stale or not the console's: reload the page.")
    g.console_session = session
    g.caller = f"console:{session.key_name}"  # the access log's caller, the scope of its keys
    return None


@blueprint.after_request
async def secure_answer(response: Response) -> Response:
    """Security headers on everything; pages are never stored; a signed-in request slides the
    session's idle time along."""
    headers = response.headers
    headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    headers["X-Frame-Options"] = "DENY"
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    if request.endpoint != "console.static":
        headers["Cache-Control"] = "no-store"
    session: ConsoleSession | None = g.get("console_session")
    if session is not None and COOKIE not in _cookies_set(response):
        _set_cookie(response, sessions().dump(session, now=time.time()), max_age=IDLE_SECONDS)
    return response


def _cookies_set(response: Response) -> set[str]:
    return {value.split("=", 1)[0] for value in response.headers.getlist("Set-Cookie")}


@blueprint.app_template_filter("when")
def when(value: datetime | str | None) -> str:
    """A time as the console shows it: UTC, to the second."""
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@blueprint.app_template_filter("shown")
def shown(value: Any) -> str:
    """A recorded value as text: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@blueprint.app_template_filter("age")
def age(seconds: float | None) -> str:
    """How long, in the largest unit that reads well."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


@blueprint.context_processor
async def common() -> dict[str, Any]:
    session: ConsoleSession | None = g.get("console_session")
    return {
        "signed_in_as": None if session is None else session.key_name,
        "csrf": None if session is None else session.csrf,
        "csrf_field": CSRF_FIELD,
    }


# -- signing in and out ---------------------------------------------------------------------------
@blueprint.get("/sign-in")
async def sign_in() -> Response:
    return await _page("sign_in.html")


@blueprint.post("/sign-in")
async def post_sign_in() -> Response:
    """An admin key (compared in constant time with each one listed) becomes a session."""
    form = await request.form
    keys = current_payment_app().settings.admin_api_keys
    key = key_of_token(form.get("token", "").strip(), keys)
    if key is None:
        logger.warning("console sign-in refused", extra={"client": request.remote_addr})
        return await _page("sign_in.html", 401, refused=True)
    now = time.time()
    session = sessions().new(key.name, now=now)
    response = _redirect(url_for("console.overview"))
    _set_cookie(response, sessions().dump(session, now=now), max_age=IDLE_SECONDS)
    logger.info("console sign-in", extra={"key": key.name, "client": request.remote_addr})
    return response


@blueprint.post("/sign-out")
async def post_sign_out() -> Response:
    response = _redirect(url_for("console.sign_in"))
    _set_cookie(response, "", max_age=0)
    return response


# -- overview -------------------------------------------------------------------------------------
LAGGING_SECONDS = 300  # an oldest pending delivery this old needs attention (OutboxDeliveryLagging)


@dataclass(frozen=True)
class EndpointRow:
    """An endpoint as the overview shows it: its row, its backlog, and why it needs attention."""

    endpoint: Endpoint
    backlog: deliveries.Backlog | None  # None: removed between the two reads
    attention: int  # 0 first: DISABLED, breaker, dead, lagging, paused, failing, fine
    why: str | None

    @property
    def name(self) -> str:
        return self.endpoint.name


ATTENTION = ("disabled", "breaker", "dead", "lagging", "paused", "failing")


def attention_first(
    found: list[Endpoint], backlog: dict[str, deliveries.Backlog]
) -> list[EndpointRow]:
    """What needs attention first: DISABLED, then a breaker not closed, dead deliveries, an
    oldest pending delivery over LAGGING_SECONDS old, PAUSED, failing lately, then the rest; the
    most dead, then the oldest pending, first within each."""
    rows = []
    for endpoint in found:
        counts = backlog.get(endpoint.name)
        dead = counts.dead if counts else 0
        age = (counts.oldest_age_seconds or 0.0) if counts else 0.0
        reasons = {
            "disabled": endpoint.state == "DISABLED",
            "breaker": endpoint.breaker != "closed",
            "dead": dead > 0,
            "lagging": age > LAGGING_SECONDS,
            "paused": endpoint.state == "PAUSED",
            "failing": endpoint.consecutive_failures > 0,
        }
        rank = next((i for i, why in enumerate(ATTENTION) if reasons[why]), len(ATTENTION))
        why = ATTENTION[rank] if rank < len(ATTENTION) else None
        rows.append(EndpointRow(endpoint, counts, rank, why))
    return sorted(
        rows,
        key=lambda r: (
            r.attention,
            -(r.backlog.dead if r.backlog else 0),
            -((r.backlog.oldest_age_seconds or 0.0) if r.backlog else 0.0),
            r.name,
        ),
    )


@dataclass(frozen=True)
class GatewayAttention:
    """The gateway's part of the overview: the review queue and the last reconciliation."""

    review: int  # operations flagged for review
    reconciliation: Reconciliation | None  # None: never run

    @property
    def differences(self) -> int:
        return self.reconciliation.differences if self.reconciliation else 0

    @property
    def needs_attention(self) -> bool:
        return self.review > 0 or self.differences > 0

    def summary(self) -> str:
        """What needs attention, in words."""
        parts = []
        if self.review:
            what = "charge or refund" if self.review == 1 else "charges or refunds"
            parts.append(f"{self.review} {what} flagged for review")
        if self.differences:
            what = "difference" if self.differences == 1 else "differences"
            parts.append(f"{self.differences} {what} in the last reconciliation")
        return "; ".join(parts)


@blueprint.get("/")
async def overview() -> Response:
    async with current_payment_app().connection() as conn:
        found = await endpoints.select_endpoints(conn)
        backlog = {b.name: b for b in await deliveries.select_backlog(conn)}
        gateway = GatewayAttention(await review.count_review(conn), await last_reconciliation(conn))
    rows = attention_first(found, backlog)
    return await _page(
        "overview.html",
        rows=rows,
        attention=sum(row.why is not None for row in rows),
        lagging_seconds=LAGGING_SECONDS,
        gateway=gateway,
    )


# -- endpoints ------------------------------------------------------------------------------------
@blueprint.get("/endpoints")
async def endpoint_list() -> Response:
    async with current_payment_app().connection() as conn:
        found = await endpoints.select_endpoints(conn)
    return await _page("endpoints.html", endpoints=found, removed=request.args.get("removed"))


@blueprint.get("/endpoints/<endpoint_name:name>")
async def endpoint_detail(name: str) -> Response:
    async with current_payment_app().connection() as conn:
        try:
            endpoint = await endpoints.select_endpoint(conn, name)
        except EndpointNotFound as error:
            return await _refused(404, str(error))
        history = await audit.select_audit(conn, target=f"endpoint:{name}", limit=ENDPOINT_HISTORY)
        backlog = {b.name: b for b in await deliveries.select_backlog(conn)}.get(name)
        sent = await deliveries.select_endpoint_deliveries(
            conn, endpoint_id=endpoint.endpoint_id, limit=ENDPOINT_DELIVERIES
        )
    return await _page(
        "endpoint.html",
        endpoint=endpoint,
        backlog=backlog,
        sent=sent,
        recent_window=deliveries.RECENT_WINDOW,
        history=history.entries,
        actions=ACTIONS.values(),
        done=ACTIONS.get(request.args.get("done", "")),
    )


class Action:
    """An endpoint action of the console: its confirmation page's words, when it applies, and
    the core function that makes it."""

    def __init__(
        self,
        name: str,
        title: str,
        explanation: str,
        applies: Callable[[Endpoint], bool],
        *,
        reason: bool = False,
        danger: bool = False,
    ) -> None:
        self.name = name
        self.title = title
        self.explanation = explanation
        self.applies = applies
        self.reason = reason  # the form asks why
        self.danger = danger


ACTIONS = {
    action.name: action
    for action in (
        Action(
            "pause",
            "Pause",
            "Its deliveries wait until it is resumed; its new events still get deliveries.",
            lambda e: e.state == "ACTIVE",
            reason=True,
        ),
        Action(
            "resume",
            "Resume",
            "Everything it held goes out now, in order; the breaker closes.",
            lambda e: e.state == "PAUSED",
        ),
        Action(
            "disable",
            "Disable",
            "Its deliveries are kept, unsent, and its new events get none until it is enabled "
            "(enabling names what it missed).",
            lambda e: e.state != "DISABLED",
            reason=True,
            danger=True,
        ),
        Action(
            "enable",
            "Enable",
            "ACTIVE again: the breaker closes and everything it kept goes out now, in order.",
            lambda e: e.state == "DISABLED",
        ),
        Action(
            "rotate-secret",
            "Rotate the secret",
            "A new signing secret, shown once on the next page. Every secret it replaced in the "
            "last 24 hours keeps signing too, so receivers can switch over.",
            lambda e: True,
            danger=True,
        ),
        Action(
            "remove",
            "Remove",
            "Deletes the endpoint and every delivery it was never delivered (pending and dead); "
            "its delivered ones stay as history until retention.",
            lambda e: True,
            danger=True,
        ),
    )
}


@blueprint.get("/endpoints/<endpoint_name:name>/<action>")
async def confirm_endpoint_action(name: str, action: str) -> Response:
    """The confirmation page of an action: what it does, and the form that does it."""
    chosen = ACTIONS.get(action)
    if chosen is None:
        return await _refused(404, "No such action.")
    async with current_payment_app().connection() as conn:
        try:
            endpoint = await endpoints.select_endpoint(conn, name)
        except EndpointNotFound as error:
            return await _refused(404, str(error))
        undelivered = await endpoints.count_undelivered(conn, name) if action == "remove" else 0
    return await _page("confirm.html", endpoint=endpoint, action=chosen, undelivered=undelivered)


Change = Callable[[Any, str, MultiDict[str, str], Operator], Awaitable[Any]]


async def _pause(conn: Any, name: str, form: MultiDict[str, str], operator: Operator) -> Any:
    return await endpoints.pause(conn, name, reason=_reason(form), operator=operator)


async def _disable(conn: Any, name: str, form: MultiDict[str, str], operator: Operator) -> Any:
    return await endpoints.disable(conn, name, reason=_reason(form), operator=operator)


async def _resume(conn: Any, name: str, form: MultiDict[str, str], operator: Operator) -> Any:
    return await endpoints.resume(conn, name, operator=operator)


async def _enable(conn: Any, name: str, form: MultiDict[str, str], operator: Operator) -> Any:
    return await endpoints.enable(conn, name, operator=operator)


async def _rotate(conn: Any, name: str, form: MultiDict[str, str], operator: Operator) -> Any:
    return await endpoints.rotate_secret(conn, name, operator=operator)


async def _remove(conn: Any, name: str, form: MultiDict[str, str], operator: Operator) -> Any:
    return await endpoints.delete_endpoint(conn, name, operator=operator)


CHANGES: dict[str, Change] = {
    "pause": _pause,
    "disable": _disable,
    "resume": _resume,
    "enable": _enable,
    "rotate-secret": _rotate,
    "remove": _remove,
}


def _reason(form: MultiDict[str, str]) -> str:
    given = form.get("reason", "").strip()
    return given or f"by {_operator().actor}"


@blueprint.post("/endpoints/<endpoint_name:name>/<action>")
async def post_endpoint_action(name: str, action: str) -> Response:
    change = CHANGES.get(action)
    if change is None:
        return await _refused(404, "No such action.")
    form = await request.form
    async with current_payment_app().connection() as conn:
        try:
            done = await change(conn, name, form, _operator())
        except EndpointNotFound as error:
            return await _refused(404, str(error))
        except EndpointError as error:  # refused as it stands (resume of a DISABLED one, …)
            return await _refused(409, str(error))
    if action == "rotate-secret":
        return await _page("rotated.html", endpoint=done)
    if action == "enable" and done[1] is not None and done[1].missed_events:
        # It missed events while DISABLED: offer to send them (a preview, then a confirmation).
        since = done[1].disabled_at.isoformat()
        return _redirect(url_for("console.replay_range", name=name, since=since, gap="1"))
    if action == "remove":
        return _redirect(url_for("console.endpoint_list", removed=name))
    return _redirect(url_for("console.endpoint_detail", name=name, done=action))


# -- a payment's story ----------------------------------------------------------------------------
REFERENCE = re.compile(r"^PAY-[0-9]{8}-[0-9a-f]{8}$")
# The gateway's ids: `pi_…` (an intent), `re_…` (a refund), letters, digits and underscores.
GATEWAY_ID = re.compile(r"^[a-z]{1,10}_[A-Za-z0-9_]{1,200}$")
MAX_ID = 2**63 - 1


def search_terms(text: str) -> dict[str, Any]:
    """What a search for `text` looks for: a reference (`PAY-20250131-1a2b3c4d`), digits as a
    payment id and a trip id at once, a gateway id (`pi_…`, `re_…`) as a charge's intent and a
    refund's id at once; nothing for anything else."""
    text = text.strip()
    if REFERENCE.fullmatch(text):
        return {"reference": text}
    if text.isascii() and text.isdigit() and 0 < int(text) <= MAX_ID:
        return {"payment_id": int(text), "trip_id": int(text)}
    if GATEWAY_ID.fullmatch(text):
        return {"intent_id": text, "gateway_refund_id": text}
    return {}


@blueprint.get("/payments")
async def payment_search() -> Response:
    """Find a payment by its id, its trip's id, its reference or a gateway id of its charge or
    refunds; one match goes to its story."""
    text = request.args.get("q", "").strip()[:100]
    terms = search_terms(text)
    found: list[Any] = []
    if terms:
        async with current_payment_app().connection() as conn:
            found = await payments.select_payments_matching(conn, **terms)
    if len(found) == 1:
        return _redirect(url_for("console.payment_story", payment_id=found[0]["payment_id"]))
    return await _page(
        "payments.html", 200 if found or not text else 404, q=text, found=found, terms=terms
    )


@blueprint.get("/payments/<payment_id:payment_id>")
async def payment_story(payment_id: int) -> Response:
    """The payment and its refunds, then its operations and webhooks at the gateway, then its
    events, each with its deliveries and attempts."""
    async with current_payment_app().connection() as conn:
        document = await payments.select_payment_document(conn, payment_id=payment_id)
        if document is None:
            return await _refused(404, f"No payment with payment_id {payment_id}.")
        gateway = await history.select_gateway_story(conn, payment_id=payment_id)
        events = await deliveries.select_payment_events(conn, payment_id=payment_id)
    payment = json.loads(document, parse_float=Decimal)
    return await _page(
        "payment.html",
        payment=payment,
        metadata=json.dumps(
            payment.get("metadata") or {}, indent=2, ensure_ascii=False, default=str
        ),
        gateway=gateway,
        webhooks_shown=history.WEBHOOKS_SHOWN,
        events=events,
        attempts_shown=deliveries.ATTEMPTS_SHOWN,
    )


# -- gateway review -------------------------------------------------------------------------------
REVIEW_PAGE = 20  # flagged operations per page (the gateway is asked about each)
DECISIONS = {"SUCCESS": "Succeeded", "FAILED": "Failed"}


def _gateway() -> Any:
    """The gateway the API charges at (None with GATEWAY=none): asked, never closed here."""
    charging = current_payment_app().charging
    return None if charging is None else charging.gateway


@blueprint.get("/gateway/review")
async def gateway_review() -> Response:
    """The charges and refunds whose outcome is unknown, oldest first, with what the gateway says
    about each now, and a decision for each payment still PENDING."""
    after_text = request.args.get("after", "")
    after = int(after_text) if after_text.isdigit() and len(after_text) < 19 else 0
    async with current_payment_app().connection() as conn:
        page = await review.select_review_page(conn, after=after, limit=REVIEW_PAGE)
        total = await review.count_review(conn)
    items = await review.ask_the_gateway(_gateway(), page.items)  # no connection held meanwhile
    later = None
    if page.has_more:
        later = url_for("console.gateway_review", after=items[-1].operation.operation_id)
    decided = request.args.get("decided", "")
    return await _page(
        "review.html",
        items=items,
        total=total,
        later=later,
        paged=after > 0,
        decided=int(decided) if decided.isdigit() and len(decided) < 19 else None,
    )


@blueprint.get("/gateway/review/<payment_id:payment_id>/<status>")
async def confirm_decision(payment_id: int, status: str) -> Response:
    """The confirmation page of a decision: the payment, what the gateway says, the form."""
    if status not in DECISIONS:
        return await _refused(404, "A decision is SUCCESS or FAILED.")
    async with current_payment_app().connection() as conn:
        document = await payments.select_payment_document(conn, payment_id=payment_id)
        if document is None:
            return await _refused(404, f"No payment with payment_id {payment_id}.")
        charge = await review.select_open_charge(conn, payment_id=payment_id)
    if charge is not None:  # asked with no connection held
        charge = (await review.ask_the_gateway(_gateway(), [charge]))[0]
    return await _page(
        "decide.html",
        payment=json.loads(document, parse_float=Decimal),
        decision=status,
        title=DECISIONS[status],
        charge=charge,
        key=f"console-decision-{uuid.uuid4()}",  # a second submit of this form replays the first
    )


@blueprint.post("/gateway/review/<payment_id:payment_id>/<status>")
async def post_decision(payment_id: int, status: str) -> Response:
    """Settle the payment as decided, through the admin API's settlement (audited there as
    `payment.settle` by `console:<key name>`); then back to the review page."""
    if status not in DECISIONS:
        return await _refused(404, "A decision is SUCCESS or FAILED.")
    form = await request.form
    reason = form.get("reason", "").strip()
    if not reason:
        return await _refused(400, "Say why (the reason goes to the audit log).")
    reference = form.get("gateway_reference", "").strip() or None
    try:
        model = service.operator_decision(form.get("key", ""), status, reason, reference)
        guard = write_guard(
            model.idempotency_key or "", SETTLEMENT_ROUTE, {"payment_id": payment_id}, model
        )
        outcome = await service.settle_payment(
            current_payment_app().pool, payment_id, model, guard=guard, operator=_operator()
        )
    except APIError as error:
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in error.errors or [])
        return await _refused(error.status, f"{error.detail} {detail}".strip())
    if outcome.status != 200:
        problem = json.loads(outcome.body)
        return await _refused(outcome.status, str(problem.get("detail", "Refused.")))
    if not outcome.replayed:
        current_payment_app().notifier.poke()  # its outbox event is committed
    return _redirect(url_for("console.gateway_review", decided=payment_id))


# -- replays ---------------------------------------------------------------------------------------
@blueprint.get("/replay")
async def replay() -> Response:
    """The two replays: dead deliveries, or a time range of events to one endpoint."""
    async with current_payment_app().connection() as conn:
        found = await endpoints.select_endpoints(conn)
    replayed = request.args.get("replayed", "")
    return await _page(
        "replay.html",
        endpoints=found,
        replayed=int(replayed) if replayed.isdigit() and len(replayed) < 10 else None,
        to=request.args.get("to", "")[:100],
    )


@blueprint.get("/replay/dead")
async def replay_dead() -> Response:
    """How many dead deliveries a replay would put back in line, per endpoint; then the form."""
    endpoint = request.args.get("name", "").strip() or None
    async with current_payment_app().connection() as conn:
        try:
            preview = await deliveries.preview_dead(conn, endpoint=endpoint)
        except EndpointNotFound as error:
            return await _refused(404, str(error))
    return await _page(
        "replay_dead.html",
        endpoint=endpoint,
        preview=preview,
        total=sum(p.dead for p in preview),
    )


@blueprint.post("/replay/dead")
async def post_replay_dead() -> Response:
    form = await request.form
    endpoint = form.get("name", "").strip() or None
    async with current_payment_app().connection() as conn:
        try:
            done = await deliveries.replay_dead(
                conn,
                event_id=None,
                endpoint=endpoint,
                operator=_operator(),
                reason=form.get("reason", "").strip() or None,
            )
        except EndpointNotFound as error:
            return await _refused(404, str(error))
    return _redirect(url_for("console.replay", replayed=len(done.replayed), to=endpoint or ""))


def _range(values: MultiDict[str, str]) -> tuple[str, datetime, datetime | None]:
    """The endpoint and [since, until) of a range replay, from a query or a form."""
    endpoint = values.get("name", "").strip()
    if not endpoint:
        raise ValueError("choose an endpoint")
    since = _time(values.get("since", "").strip(), "since")
    if since is None:
        raise ValueError("since: give the time the range starts at")
    until = _time(values.get("until", "").strip(), "until")
    if until is not None and until <= since:
        raise ValueError("until must be later than since")
    return endpoint, since, until


@blueprint.get("/replay/range")
async def replay_range() -> Response:
    """What a range replay would send the endpoint now; then the form."""
    try:
        endpoint, since, until = _range(request.args)
    except ValueError as error:
        return await _refused(400, str(error))
    async with current_payment_app().connection() as conn:
        try:
            preview = await deliveries.preview_range(
                conn, endpoint=endpoint, since=since, until=until
            )
        except EndpointNotFound as error:
            return await _refused(404, str(error))
    return await _page(
        "replay_range.html",
        endpoint=endpoint,
        since=since,
        until=until,
        preview=preview,
        gap=request.args.get("gap") == "1",
    )


@blueprint.post("/replay/range")
async def post_replay_range() -> Response:
    form = await request.form
    try:
        endpoint, since, until = _range(form)
    except ValueError as error:
        return await _refused(400, str(error))
    async with current_payment_app().connection() as conn:
        try:
            done = await deliveries.replay_range(
                conn,
                endpoint=endpoint,
                since=since,
                until=until,
                operator=_operator(),
                reason=form.get("reason", "").strip() or None,
            )
        except EndpointNotFound as error:
            return await _refused(404, str(error))
    return _redirect(url_for("console.replay", replayed=done.added + done.again, to=endpoint))


# -- audit ----------------------------------------------------------------------------------------
@blueprint.get("/audit")
async def audit_log() -> Response:
    filters = {key: request.args.get(key, "").strip()[:200] for key in AUDIT_FILTERS}
    error = None
    try:
        if any(not value.isprintable() for value in filters.values()):
            raise ValueError("filters are one line of text, without control characters")
        times = {key: _time(filters[key], key) for key in ("since", "until")}
        before = request.args.get("before", "")
        before_id = int(before) if before.isdigit() and len(before) < 19 else None
    except ValueError as problem:
        error, times, before_id = str(problem), {"since": None, "until": None}, None
    page = audit.AuditPage([], has_more=False)
    if error is None:
        async with current_payment_app().connection() as conn:
            page = await audit.select_audit(
                conn,
                since=times["since"],
                until=times["until"],
                actor=filters["actor"] or None,
                action=filters["action"] or None,
                target=filters["target"] or None,
                limit=AUDIT_PAGE,
                before_id=before_id,
            )
    older = None
    if page.has_more:
        given: dict[str, Any] = {key: value for key, value in filters.items() if value}
        older = url_for("console.audit_log", **given, before=page.entries[-1].audit_id)
    return await _page(
        "audit.html",
        400 if error else 200,
        entries=page.entries,
        filters=filters,
        error=error,
        older=older,
        paged=before_id is not None,
    )


AUDIT_FILTERS = ("actor", "action", "target", "since", "until")


def _time(text: str, name: str) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name}: not an ISO 8601 time ({text[:40]!r})") from None
    if value.tzinfo is None:
        raise ValueError(f"{name}: add an offset (Z or +05:30, say) to {text[:40]!r}")
    return value
