"""The Stripe adapter: the `Gateway` protocol over Stripe's API, through the official SDK.

The only module that knows Stripe's field names. Choices, and why:
- **HTTP client**: the SDK's aiohttp client. Measured against the embedded gateway, a call cost
  about half the client CPU of the SDK's default HTTPX client (docs/gateway.md has the figures
  and the command), and a charge is two calls.
- **Answers read as JSON**: the calls of a charge or a refund go through the SDK's raw request
  (`raw_request_async`: the same request, options, time-out and typed errors as its services)
  and their answers are read from the parsed JSON, without the SDK building its objects from
  them, which cost about as much client CPU as the rest of the call (docs/gateway.md). Listings
  (reconciliation) keep the SDK's services and their paging.
- **Time-out**: one per call (`GATEWAY_TIMEOUT_SECONDS`), for the whole exchange. An expired
  call is an unknown outcome, not a failure.
- **The SDK's retries: none.** They would resend within the call with the call's one idempotency
  key, which is safe at Stripe; but our keys are already stable across calls and processes (each
  is derived from our ids), so the next phase — the gateway worker asking the gateway about the
  intent or the refund, then acting with the same key — does what a retry would, without
  stretching the request past the time-out the API promises its clients (each try may take the
  whole time-out, plus back-off). It also keeps the embedded gateway honest: that one ignores
  idempotency keys, so a blind resend of a refund whose answer was lost would refund twice there.
- **Idempotency keys** derived from our ids and from ids that are unique at the gateway, so two
  deployments sharing one Stripe account (developers on one test key) never replay each other's
  requests: `payment-<id>-<reference>-create`, `payment-<id>-confirm-<intent>`,
  `payment-<id>-cancel-<intent>`, `refund-<id>-<intent>`.
- **`off_session`** on the confirm of a saved method: Stripe wants it for a charge made while the
  rider is not in the app; the embedded gateway refuses it. `api_flavour="localstripe"` leaves it
  out, and lists without the `created` filter that gateway does not take.
The API key and the webhook secret stay inside the SDK client and this object; neither appears in
a repr, a log line or an error's text.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import aiohttp
import stripe

from payment_service.gateway.amounts import from_minor_units, to_minor_units
from payment_service.gateway.interface import (
    ChargeRequest,
    EventKind,
    GatewayDeclined,
    GatewayEvent,
    GatewayNotFound,
    GatewayOutcomeUnknown,
    GatewayRefused,
    Intent,
    IntentStatus,
    Listing,
    Refund,
    RefundRequest,
    RefundStatus,
    WebhookRejected,
)

ApiFlavour = Literal["stripe", "localstripe"]
T = TypeVar("T")

LIST_PAGE_SIZE = 100  # Stripe's largest page
# How old a webhook's signature may be (seconds): Stripe's own default tolerance.
WEBHOOK_TOLERANCE_SECONDS = 300
SIGNATURE_HEADER = "stripe-signature"

_INTENT_STATUSES = {
    "requires_confirmation": IntentStatus.REQUIRES_CONFIRMATION,
    "requires_action": IntentStatus.REQUIRES_ACTION,
    "processing": IntentStatus.PROCESSING,
    "succeeded": IntentStatus.SUCCEEDED,
    "canceled": IntentStatus.CANCELED,
}
_REFUND_STATUSES = {
    "pending": RefundStatus.PENDING,
    "requires_action": RefundStatus.REQUIRES_ACTION,
    "succeeded": RefundStatus.SUCCEEDED,
    "failed": RefundStatus.FAILED,
    "canceled": RefundStatus.CANCELED,
}
_CONFIRMABLE = frozenset({IntentStatus.REQUIRES_CONFIRMATION})
_CANCELABLE = frozenset({IntentStatus.REQUIRES_CONFIRMATION, IntentStatus.REQUIRES_ACTION})
# Our methods whose gateway method type is known; the others let the gateway decide by the
# payment method itself.
_METHOD_TYPES = {"CARD": ["card"], "WALLET": ["card"]}  # wallets pay with card-type methods


def create_key(payment_id: int, reference: str) -> str:
    return f"payment-{payment_id}-{reference}-create"


def confirm_key(payment_id: int, intent_id: str) -> str:
    return f"payment-{payment_id}-confirm-{intent_id}"


def cancel_key(payment_id: int, intent_id: str) -> str:
    return f"payment-{payment_id}-cancel-{intent_id}"


def refund_key(refund_id: int, intent_id: str) -> str:
    return f"refund-{refund_id}-{intent_id}"


class StripeGateway:
    """The gateway at `api_base`, spoken to with `api_key`. Use within one event loop."""

    name = "stripe"

    def __init__(
        self,
        *,
        api_key: str,
        api_base: str,
        webhook_secret: str | None,
        timeout_seconds: float,
        api_flavour: ApiFlavour = "stripe",
        http_client: stripe.HTTPClient | None = None,
    ) -> None:
        self._api_base = api_base.rstrip("/")
        self._webhook_secret = webhook_secret
        self._timeout_seconds = timeout_seconds
        self._flavour: ApiFlavour = api_flavour
        self._http = http_client or stripe.AIOHTTPClient(
            timeout=aiohttp.ClientTimeout(total=timeout_seconds)
        )
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": self._api_base},
            http_client=self._http,
            max_network_retries=0,
        )

    def __repr__(self) -> str:
        return f"StripeGateway(api_base={self._api_base!r}, flavour={self._flavour!r})"

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    # -- charges --------------------------------------------------------------------------------
    async def create_intent(self, charge: ChargeRequest) -> Intent:
        params: dict[str, Any] = {
            "amount": to_minor_units(charge.amount, charge.currency),
            "currency": charge.currency.lower(),
            "payment_method": charge.payment_method,
            "metadata": {
                "payment_id": str(charge.payment_id),
                "trip_id": str(charge.trip_id),
                "reference": charge.reference,
            },
        }
        if charge.customer:
            params["customer"] = charge.customer
        if types := _METHOD_TYPES.get(charge.method):
            params["payment_method_types"] = types
        key = create_key(charge.payment_id, charge.reference)
        return await self._intent_call(
            lambda: self._request("post", "/v1/payment_intents", params, key=key)
        )

    async def confirm(self, intent_id: str, *, payment_id: int, saved_method: bool) -> Intent:
        params: dict[str, Any] = {}
        if saved_method and self._flavour == "stripe":
            params["off_session"] = True
        key = confirm_key(payment_id, intent_id)
        try:
            return await self._intent_call(
                lambda: self._request("post", _intent_path(intent_id, "confirm"), params, key=key)
            )
        except (GatewayNotFound, GatewayDeclined):
            raise
        except GatewayRefused as refusal:
            # Refused because it was confirmed already, by a call whose answer was lost (at a
            # gateway that no longer replays the key)? Then its state is the answer.
            return await self._unless_moved_on(intent_id, refusal, _CONFIRMABLE)

    async def retrieve(self, intent_id: str) -> Intent:
        return await self._intent_call(lambda: self._request("get", _intent_path(intent_id)))

    async def cancel(self, intent_id: str, *, payment_id: int) -> Intent:
        key = cancel_key(payment_id, intent_id)
        try:
            return await self._intent_call(
                lambda: self._request("post", _intent_path(intent_id, "cancel"), key=key)
            )
        except GatewayNotFound:
            raise
        except GatewayRefused as refusal:
            # Not cancelable any more: confirmed (or canceled) meanwhile. Its state is the answer.
            return await self._unless_moved_on(intent_id, refusal, _CANCELABLE)

    async def _unless_moved_on(
        self, intent_id: str, refusal: GatewayRefused, before: frozenset[IntentStatus]
    ) -> Intent:
        """The intent's state after a refused change, if it has moved on from the states
        `before` the change; otherwise the refusal stands."""
        intent = await self.retrieve(intent_id)
        if intent.status in before:
            raise refusal
        return intent

    # -- refunds ----------------------------------------------------------------------------------
    async def refund(self, request: RefundRequest) -> Refund:
        params = {
            "payment_intent": request.intent_id,
            # Always explicit: a gateway that does not check over-refunds would otherwise refund
            # the whole charge again.
            "amount": to_minor_units(request.amount, request.currency),
            "metadata": {
                "refund_id": str(request.refund_id),
                "payment_id": str(request.payment_id),
            },
        }
        key = refund_key(request.refund_id, request.intent_id)
        return await self._refund_call(
            lambda: self._request("post", "/v1/refunds", params, key=key)
        )

    async def retrieve_refund(self, gateway_refund_id: str) -> Refund:
        return await self._refund_call(
            lambda: self._request("get", f"/v1/refunds/{_path_id(gateway_refund_id)}")
        )

    async def find_refund(self, intent_id: str, refund_id: int) -> Refund | None:
        wanted = str(refund_id)
        for raw in await self._list_all(
            self._client.v1.refunds.list_async, {"payment_intent": intent_id}
        ):
            if _metadata(raw).get("refund_id") == wanted:
                return _parse(_refund_from, raw)
        return None

    # -- reconciliation ---------------------------------------------------------------------------
    async def list_since(self, since: datetime, until: datetime | None = None) -> Listing:
        # The gateway's clock has whole seconds: the window widens to them.
        start = math.floor(since.timestamp())
        end = math.ceil((until or datetime.now(UTC)).timestamp())
        filters: dict[str, Any] = {}
        if self._flavour == "stripe":
            filters["created"] = {"gte": start, "lt": end}
        intents = await self._list_all(self._client.v1.payment_intents.list_async, filters)
        refunds = await self._list_all(self._client.v1.refunds.list_async, filters)
        return Listing(
            intents=tuple(
                _parse(_intent_from, raw) for raw in intents if start <= raw["created"] < end
            ),
            refunds=tuple(
                _parse(_refund_from, raw) for raw in refunds if start <= raw["created"] < end
            ),
        )

    async def _list_all(
        self, list_page: Callable[..., Awaitable[Any]], filters: dict[str, Any]
    ) -> list[Any]:
        """Every object of a list, page by page (the order differs between gateways)."""
        objects: list[Any] = []
        after: str | None = None
        while True:
            params = {**filters, "limit": LIST_PAGE_SIZE}
            if after:
                params["starting_after"] = after
            page = await self._call(functools.partial(list_page, params=params))
            data = list(page.data)
            objects.extend(data)
            if not page.has_more or not data:
                return objects
            after = data[-1]["id"]

    # -- webhooks ----------------------------------------------------------------------------------
    def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> GatewayEvent:
        if not self._webhook_secret:
            raise WebhookRejected("no webhook secret is configured: no webhook can be verified")
        signature = next(
            (value for name, value in headers.items() if name.lower() == SIGNATURE_HEADER), None
        )
        try:
            stripe.WebhookSignature.verify_header(
                body, signature, self._webhook_secret, WEBHOOK_TOLERANCE_SECONDS
            )
        except stripe.SignatureVerificationError as error:
            raise WebhookRejected(f"bad signature: {error.user_message}") from None
        except (UnicodeDecodeError, ValueError):
            raise WebhookRejected("bad signature: the body or the header is malformed") from None
        try:
            event = json.loads(body)
            return _event_from(event)
        except (ValueError, KeyError, TypeError) as error:
            raise WebhookRejected(f"not an event: {type(error).__name__}") from None

    # -- calls -------------------------------------------------------------------------------------
    async def _intent_call(self, call: Callable[[], Awaitable[Any]]) -> Intent:
        return _parse(_intent_from, await self._call(call))

    async def _refund_call(self, call: Callable[[], Awaitable[Any]]) -> Refund:
        return _parse(_refund_from, await self._call(call))

    async def _request(
        self,
        method: Literal["get", "post"],
        path: str,
        params: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
    ) -> Any:
        """One request, answered as the gateway's parsed JSON object (see the module)."""
        options = {"idempotency_key": key} if key else {}
        response = await self._client.raw_request_async(method, path, **(params or {}), **options)
        return response.data

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """One request; the SDK's errors as ours. Messages never carry the request or a key."""
        try:
            # The HTTP client's time-out covers the exchange; this one bounds whatever else the
            # SDK does around it.
            async with asyncio.timeout(self._timeout_seconds + 1):
                return await call()
        except TimeoutError:
            raise GatewayOutcomeUnknown("timeout") from None
        except stripe.CardError as error:
            raise GatewayDeclined(
                _message(error), code=error.code, http_status=error.http_status
            ) from None
        except stripe.RateLimitError:
            raise GatewayOutcomeUnknown("rate limited") from None
        except stripe.IdempotencyError:
            # Our key was used with other parameters: whatever the first use did stands.
            raise GatewayOutcomeUnknown("idempotency key reused") from None
        except stripe.InvalidRequestError as error:
            cls = GatewayNotFound if error.http_status == 404 else GatewayRefused
            raise cls(_message(error), code=error.code, http_status=error.http_status) from None
        except (stripe.AuthenticationError, stripe.PermissionError) as error:
            # Our credentials, not the payment: never a reason to fail a payment.
            raise GatewayOutcomeUnknown(f"credentials refused ({error.http_status})") from None
        except stripe.APIConnectionError as error:
            reason = "timeout" if isinstance(error.__cause__, TimeoutError) else "connection"
            raise GatewayOutcomeUnknown(reason) from None
        except stripe.APIError as error:
            status = error.http_status
            reason = f"http {status}" if status and status >= 300 else "unreadable answer"
            raise GatewayOutcomeUnknown(reason) from None
        except stripe.StripeError as error:
            raise GatewayOutcomeUnknown(type(error).__name__) from None


def _path_id(object_id: str) -> str:
    """An id as one path segment (as the SDK's services quote it)."""
    return urllib.parse.quote_plus(object_id)


def _intent_path(intent_id: str, action: str | None = None) -> str:
    path = f"/v1/payment_intents/{_path_id(intent_id)}"
    return f"{path}/{action}" if action else path


# -- reading Stripe's objects (parsed JSON, SDK objects and webhook dicts alike) -------------------
def _get(obj: Any, key: str) -> Any:
    return obj[key] if obj is not None and key in obj else None


def _metadata(obj: Any) -> dict[str, str]:
    metadata = _get(obj, "metadata")
    if isinstance(metadata, stripe.StripeObject):
        metadata = metadata.to_dict(recursive=False)
    return {str(key): str(value) for key, value in (metadata or {}).items()}


def _our_id(value: str | None) -> int | None:
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


def _created(obj: Any) -> datetime:
    return datetime.fromtimestamp(int(obj["created"]), UTC)


def _intent_from(obj: Any) -> Intent:
    currency = str(obj["currency"]).upper()
    error = _get(obj, "last_payment_error")
    raw_status = obj["status"]
    if raw_status == "requires_payment_method":
        # Back to square one: after a failed attempt (the error says why), or never given one.
        status = IntentStatus.FAILED if error else IntentStatus.REQUIRES_CONFIRMATION
    elif raw_status in _INTENT_STATUSES:
        status = _INTENT_STATUSES[raw_status]
    else:
        raise GatewayOutcomeUnknown("unreadable answer", f"unexpected intent status {raw_status!r}")
    metadata = _metadata(obj)
    failed = status == IntentStatus.FAILED
    return Intent(
        id=str(obj["id"]),
        status=status,
        amount=from_minor_units(int(obj["amount"]), currency),
        currency=currency,
        created=_created(obj),
        payment_id=_our_id(metadata.get("payment_id")),
        trip_id=_our_id(metadata.get("trip_id")),
        reference=metadata.get("reference"),
        failure_code=_get(error, "code") if failed else None,
        failure_message=_get(error, "message") if failed else None,
    )


def _refund_from(obj: Any) -> Refund:
    currency = str(obj["currency"]).upper()
    raw_status = obj["status"]
    if raw_status not in _REFUND_STATUSES:
        raise GatewayOutcomeUnknown("unreadable answer", f"unexpected refund status {raw_status!r}")
    metadata = _metadata(obj)
    intent = _get(obj, "payment_intent")
    return Refund(
        id=str(obj["id"]),
        status=_REFUND_STATUSES[raw_status],
        amount=from_minor_units(int(obj["amount"]), currency),
        currency=currency,
        created=_created(obj),
        intent_id=intent if isinstance(intent, str) or intent is None else str(intent["id"]),
        refund_id=_our_id(metadata.get("refund_id")),
        payment_id=_our_id(metadata.get("payment_id")),
        failure_code=_get(obj, "failure_reason"),
    )


def _event_from(event: dict[str, Any]) -> GatewayEvent:
    if event.get("object") != "event":
        raise ValueError("not an event object")
    gateway_type = str(event["type"])
    obj = event["data"]["object"]
    kind = {"payment_intent": EventKind.INTENT, "refund": EventKind.REFUND}.get(
        obj.get("object"), EventKind.OTHER
    )
    try:
        return GatewayEvent(
            id=str(event["id"]),
            kind=kind,
            created=_created(event),
            gateway_type=gateway_type,
            intent=_intent_from(obj) if kind == EventKind.INTENT else None,
            refund=_refund_from(obj) if kind == EventKind.REFUND else None,
        )
    except GatewayOutcomeUnknown as error:
        raise ValueError(str(error)) from None


def _parse(parse: Callable[[Any], T], obj: Any) -> T:
    """An answer we cannot read is an unknown outcome: the gateway may have acted."""
    try:
        return parse(obj)
    except GatewayOutcomeUnknown:
        raise
    except (KeyError, TypeError, ValueError, ArithmeticError) as error:
        raise GatewayOutcomeUnknown("unreadable answer", type(error).__name__) from None


def _message(error: stripe.StripeError) -> str:
    """The gateway's own message for a refusal (public text, never our request)."""
    message = error.user_message or ""
    return message.strip()[:500] or f"HTTP {error.http_status}"
