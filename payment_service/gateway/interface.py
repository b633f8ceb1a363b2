"""The gateway as the service sees it: one small protocol, its domain types and its errors.

Money moves at the gateway in two steps: an intent is created unconfirmed (no money can move
through it yet) and its id recorded, then it is confirmed. Every call that changes something at
the gateway carries an idempotency key derived from our own ids, so a call repeated after a crash
or a lost answer is the same call, never a second charge.

Errors say what the caller may conclude:
- `GatewayRefused` (and `GatewayDeclined`, `GatewayNotFound`): the gateway answered and decided;
  nothing moved. Its code and message are kept for the payment's failure_code/failure_message.
- `GatewayOutcomeUnknown`: a time-out, a lost connection, a 5xx, a 429, an answer we could not
  read. The gateway may have acted. Ask it again later (`retrieve`, `find_refund`); never assume
  a failure.
No error's text ever holds a secret: messages are built from the gateway's public answer only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol


class IntentStatus(enum.StrEnum):
    """Where a charge stands at the gateway."""

    REQUIRES_CONFIRMATION = "REQUIRES_CONFIRMATION"  # created, never confirmed: nothing moved
    REQUIRES_ACTION = "REQUIRES_ACTION"  # the payer must act (3-D Secure): nothing moved yet
    PROCESSING = "PROCESSING"  # confirmed, not decided yet (asynchronous methods): ask again
    SUCCEEDED = "SUCCEEDED"  # the money moved
    FAILED = "FAILED"  # the gateway tried and failed (a decline): nothing moved
    CANCELED = "CANCELED"  # canceled before it was charged: nothing moved

    @property
    def final(self) -> bool:
        """Decided for good: the gateway will not change it by itself."""
        return self in _FINAL_INTENT

    @property
    def confirmed(self) -> bool:
        """Confirmed at the gateway: money moved, may still move, or the attempt failed."""
        return self in _CONFIRMED_INTENT


_FINAL_INTENT = frozenset({IntentStatus.SUCCEEDED, IntentStatus.FAILED, IntentStatus.CANCELED})
_CONFIRMED_INTENT = frozenset(
    {IntentStatus.PROCESSING, IntentStatus.SUCCEEDED, IntentStatus.FAILED}
)


class RefundStatus(enum.StrEnum):
    """Where a refund stands at the gateway."""

    PENDING = "PENDING"  # accepted, not decided yet: ask again
    REQUIRES_ACTION = "REQUIRES_ACTION"  # the gateway needs something from us or the payer
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # decided: the money stayed with us
    CANCELED = "CANCELED"

    @property
    def final(self) -> bool:
        return self in _FINAL_REFUND


_FINAL_REFUND = frozenset({RefundStatus.SUCCEEDED, RefundStatus.FAILED, RefundStatus.CANCELED})


@dataclass(frozen=True)
class ChargeRequest:
    """What the service asks the gateway to charge, in its own words."""

    payment_id: int
    trip_id: int
    reference: str  # PAY-YYYYMMDD-xxxxxxxx
    amount: Decimal
    currency: str  # ISO 4217, upper case
    method: str  # ours: CARD, UPI, WALLET, NETBANKING
    payment_method: str  # the gateway's id of the payer's method (saved, or the test one)
    customer: str | None = None  # the gateway's id of the payer, when the method is saved


@dataclass(frozen=True)
class RefundRequest:
    refund_id: int
    payment_id: int
    intent_id: str
    amount: Decimal
    currency: str  # ISO 4217, upper case: the payment's


@dataclass(frozen=True)
class Intent:
    """A charge at the gateway, as far as the service cares."""

    id: str
    status: IntentStatus
    amount: Decimal
    currency: str  # ISO 4217, upper case
    created: datetime  # aware, UTC; whole seconds at most gateways
    payment_id: int | None  # ours, from the intent's metadata (None: not made by this service)
    trip_id: int | None = None
    reference: str | None = None
    failure_code: str | None = None  # the gateway's, when FAILED
    failure_message: str | None = None


@dataclass(frozen=True)
class Refund:
    """A refund at the gateway."""

    id: str
    status: RefundStatus
    amount: Decimal
    currency: str
    created: datetime
    intent_id: str | None
    refund_id: int | None  # ours, from the refund's metadata
    payment_id: int | None
    failure_code: str | None = None


class EventKind(enum.StrEnum):
    INTENT = "INTENT"  # `GatewayEvent.intent` holds the intent as the event saw it
    REFUND = "REFUND"  # `GatewayEvent.refund` likewise
    OTHER = "OTHER"  # nothing the service acts on


@dataclass(frozen=True)
class GatewayEvent:
    """A verified webhook: the gateway's event id and the object it carried, in our types.

    The snapshot may be older than the object's state (events can arrive late, twice, or out of
    order): apply it forward only, and ask the gateway when the order matters.
    """

    id: str  # unique per event at the gateway: store it once
    kind: EventKind
    created: datetime
    gateway_type: str  # the gateway's own name for it: for logs and storage, never for decisions
    intent: Intent | None = None
    refund: Refund | None = None


@dataclass(frozen=True)
class Listing:
    """The gateway's intents and refunds created in a window (reconciliation)."""

    intents: tuple[Intent, ...]
    refunds: tuple[Refund, ...]


class GatewayError(Exception):
    """Something went wrong talking to the gateway."""


class GatewayOutcomeUnknown(GatewayError):
    """The gateway may or may not have acted: ask it again later, never assume a failure.

    `reason` is short and fixed ("timeout", "connection", "http 503", "rate limited", …), fit for
    logs and metric labels.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"gateway outcome unknown ({reason}){': ' + detail if detail else ''}")


class GatewayRefused(GatewayError):
    """The gateway answered and refused the call: nothing moved.

    `code` and `message` are the gateway's (for failure_code / failure_message); `http_status`
    is the status it answered with.
    """

    def __init__(self, message: str, *, code: str | None, http_status: int | None) -> None:
        self.code = code
        self.message = message
        self.http_status = http_status
        super().__init__(f"gateway refused ({http_status}, {code or 'no code'}): {message}")


class GatewayDeclined(GatewayRefused):
    """The payer's method was declined: the payment failed, nothing moved."""


class GatewayNotFound(GatewayRefused):
    """The gateway knows no such object."""


class WebhookRejected(GatewayError):
    """A webhook that is not the gateway's: a bad or missing signature, a stale timestamp, or a
    body that is not an event. Answer 400 and change nothing."""


class AmountNotRepresentable(GatewayError, ValueError):
    """The currency cannot carry this amount at the gateway (too many decimals for it)."""


class Gateway(Protocol):
    """What the service needs of a payment gateway. Every call is idempotent by our ids."""

    async def create_intent(self, charge: ChargeRequest) -> Intent:
        """Create the charge unconfirmed: nothing can move until `confirm`."""
        ...

    async def confirm(self, intent_id: str, *, payment_id: int, saved_method: bool) -> Intent:
        """Confirm a created intent. Confirming one that was already confirmed (an earlier call
        whose answer was lost) answers its current state. A decline raises `GatewayDeclined`."""
        ...

    async def retrieve(self, intent_id: str) -> Intent: ...

    async def cancel(self, intent_id: str, *, payment_id: int) -> Intent:
        """Cancel an unconfirmed intent. One the gateway can no longer cancel (it was charged
        meanwhile) is answered as it stands: check the status."""
        ...

    async def refund(self, request: RefundRequest) -> Refund: ...

    async def retrieve_refund(self, gateway_refund_id: str) -> Refund: ...

    async def find_refund(self, intent_id: str, refund_id: int) -> Refund | None:
        """Our refund `refund_id` at the gateway, if it was made (its answer may have been lost)."""
        ...

    async def list_since(self, since: datetime, until: datetime | None = None) -> Listing:
        """Intents and refunds created in [since, until) (until: now), for reconciliation."""
        ...

    def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> GatewayEvent:
        """Verify a webhook's signature and read it; `WebhookRejected` if it is not genuine."""
        ...

    async def close(self) -> None: ...
