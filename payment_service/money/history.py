"""A payment's life at the gateway, as the console's payment story shows it: its charge and its
refunds as gateway operations (intent ids, phase, checks, outcome, last error), and the gateway's
webhooks about it (gateway_events).

Each read goes through an index of the payment's own rows: the charge by
gateway_operations_one_charge_per_payment, the refunds by their refund ids
(gateway_operations_one_per_refund), the webhooks by gateway_events_payment_idx (the newest
WEBHOOKS_SHOWN of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from payment_service.sql import Statement

WEBHOOKS_SHOWN = 50

_OPERATION_COLUMNS = """o.operation_id, o.kind, o.refund_id, o.phase, o.intent_id,
           o.gateway_refund_id, o.outcome, o.checks, o.unknown_checks, o.last_error,
           o.next_check_at, coalesce(o.locked_until > now(), false) AS leased, o.created_at,
           o.updated_at"""

# The payment's charge, then its refunds' operations, oldest first.
OPERATIONS_OF_PAYMENT = Statement(
    f"""
    SELECT {_OPERATION_COLUMNS}
      FROM gateway_operations AS o
     WHERE o.payment_id = :payment_id
       AND o.kind = 'CHARGE'
    UNION ALL
    SELECT {_OPERATION_COLUMNS}
      FROM gateway_operations AS o
     WHERE o.kind = 'REFUND'
       AND o.refund_id = ANY (ARRAY(SELECT r.refund_id
                                      FROM payment_refunds AS r
                                     WHERE r.payment_id = :payment_id))
     ORDER BY operation_id
    """
)

# The gateway's webhooks about the payment, newest first (one more than shown: are there more?).
WEBHOOKS_OF_PAYMENT = Statement(
    """
    SELECT g.event_id, g.gateway_type, g.object_id, g.outcome, g.created_at, g.received_at
      FROM gateway_events AS g
     WHERE g.payment_id = :payment_id
     ORDER BY g.received_at DESC, g.event_id DESC
     LIMIT :limit
    """
)


@dataclass(frozen=True)
class GatewayOperation:
    operation_id: int
    kind: str  # CHARGE | REFUND
    refund_id: int | None
    phase: str  # STARTED | PENDING | DONE | REVIEW
    intent_id: str | None
    gateway_refund_id: str | None
    outcome: str | None
    checks: int
    unknown_checks: int
    last_error: str | None
    next_check_at: datetime
    leased: bool  # a call to the gateway for it may be in flight
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class GatewayWebhook:
    event_id: str
    gateway_type: str
    object_id: str | None
    outcome: str  # applied | final_already | not_ours | not_final | ignored
    created_at: datetime  # at the gateway
    received_at: datetime


@dataclass(frozen=True)
class GatewayStory:
    operations: list[GatewayOperation]
    webhooks: list[GatewayWebhook]  # the newest WEBHOOKS_SHOWN, newest first
    more_webhooks: bool


async def select_gateway_story(conn: asyncpg.Connection, *, payment_id: int) -> GatewayStory:
    """The payment's operations at the gateway and the gateway's webhooks about it."""
    operations = await conn.fetch(
        OPERATIONS_OF_PAYMENT.sql, *OPERATIONS_OF_PAYMENT.args(payment_id=payment_id)
    )
    webhooks = await conn.fetch(
        WEBHOOKS_OF_PAYMENT.sql,
        *WEBHOOKS_OF_PAYMENT.args(payment_id=payment_id, limit=WEBHOOKS_SHOWN + 1),
    )
    return GatewayStory(
        [GatewayOperation(**dict(row)) for row in operations],
        [GatewayWebhook(**dict(row)) for row in webhooks[:WEBHOOKS_SHOWN]],
        more_webhooks=len(webhooks) > WEBHOOKS_SHOWN,
    )
