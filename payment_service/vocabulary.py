"""The lists of values the service's tables take, written once: every other module imports them.

Each list is a `Literal` type (for pydantic models and mypy) and the tuple of its values, in the
order messages and documents show them. The migrations repeat them as CHECK constraints, which
SQL cannot import; tests/migrations/test_vocabulary.py reads those constraints from a migrated
database and fails when a list here and its constraint disagree.

What an endpoint's event types may be (exact types, `payment.*`-style prefixes (`refund.*` too),
`*`) is here too,
as a pure check: the settings (`TRIP_EVENT_TYPES`, …) and payment_service.endpoints both use it,
and it needs nothing but the list of event types.
"""

from __future__ import annotations

from typing import Literal, get_args

PaymentMethod = Literal["CARD", "UPI", "WALLET", "CASH", "NETBANKING"]
PAYMENT_METHODS: tuple[PaymentMethod, ...] = get_args(PaymentMethod)
# Charged at the gateway unless GATEWAY_METHODS says otherwise; the rest are recorded at once.
# CASH never is: it is paid to the driver.
GATEWAY_METHODS: tuple[PaymentMethod, ...] = ("CARD", "UPI", "WALLET", "NETBANKING")

PaymentStatus = Literal["PENDING", "SUCCESS", "FAILED", "PARTIALLY_REFUNDED", "REFUNDED"]
PAYMENT_STATUSES: tuple[PaymentStatus, ...] = get_args(PaymentStatus)

# A refund made at the gateway is PENDING until the gateway decides: REFUNDED, or FAILED (refused).
RefundStatus = Literal["PENDING", "REFUNDED", "FAILED"]
REFUND_STATUSES: tuple[RefundStatus, ...] = get_args(RefundStatus)

# What happened to a payment: an outbox event's type, the callbacks' `type`. refund.failed: a
# refund the gateway refused (its amount may be refunded again).
EventType = Literal[
    "payment.succeeded", "payment.pending", "payment.failed", "payment.refunded", "refund.failed"
]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)

# A delivery (one event to one endpoint): PENDING until DELIVERED, or DEAD once given up on.
DeliveryStatus = Literal["PENDING", "DELIVERED", "DEAD"]
DELIVERY_STATUSES: tuple[DeliveryStatus, ...] = get_args(DeliveryStatus)

EndpointState = Literal["ACTIVE", "PAUSED", "DISABLED"]
ENDPOINT_STATES: tuple[EndpointState, ...] = get_args(EndpointState)

# A charge or a refund at the payment gateway (payment_service.money.operations), and where it
# stands: STARTED (its calls in progress), PENDING (waiting for the gateway to decide), DONE,
# REVIEW (its outcome stayed unknown: an operator decides).
OperationKind = Literal["CHARGE", "REFUND"]
OPERATION_KINDS: tuple[OperationKind, ...] = get_args(OperationKind)
OperationPhase = Literal["STARTED", "PENDING", "DONE", "REVIEW"]
OPERATION_PHASES: tuple[OperationPhase, ...] = get_args(OperationPhase)

MAX_EVENT_TYPES = 10  # patterns per endpoint: more than the event types and prefixes there are


def event_type_patterns(types: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """An endpoint's event types as given: exact event types, `payment.*`-style prefixes, or `*`;
    at least one, at most MAX_EVENT_TYPES; blanks and duplicates dropped. ValueError says why
    not."""
    given = [t.strip() for t in types if t.strip()]
    cleaned = tuple(dict.fromkeys(given))
    if not cleaned:
        raise ValueError("an endpoint subscribes to at least one event type (or '*')")
    if len(given) > MAX_EVENT_TYPES:
        raise ValueError(f"an endpoint subscribes to at most {MAX_EVENT_TYPES} event types")
    for pattern in cleaned:
        if pattern == "*" or pattern in EVENT_TYPES:
            continue
        if pattern.endswith(".*") and any(t.startswith(pattern[:-1]) for t in EVENT_TYPES):
            continue
        raise ValueError(
            f"unknown event type {pattern[:80]!r}: use {', '.join(EVENT_TYPES)}, a prefix such "
            "as 'payment.*', or '*'"
        )
    return cleaned
