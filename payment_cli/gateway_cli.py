"""`payment-service gateway review [--json]`: the charges and refunds flagged for review;
`payment-service gateway settle PAYMENT_ID SUCCESS|FAILED --reason …`: an operator's decision.

An operation is flagged when the gateway worker could not learn its outcome GATEWAY_MAX_CHECKS
times in a row (the gateway down, answers that cannot be read): the payment stays PENDING (or the
refund PENDING) rather than be guessed. This lists each one with what the gateway says about it
now, asked afresh (when a gateway is configured), so that an operator can decide it with POST
/admin/payments/{id}/settlement (or the console's review page, or `gateway settle`: the three
go through one core function, which records `payment.settle` in the audit log, here as
`cli:<operating-system user>`), or wait for the worker's next hourly check to finish it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from payment_cli.actions import add_action, fail
from payment_service.audit import Operator
from payment_service.config import Settings
from payment_service.database import connect, create_pool
from payment_service.entry import database_settings, printable
from payment_service.gateway.factory import gateway_from_settings
from payment_service.money import review


async def _review(settings: Settings) -> list[dict[str, Any]]:
    conn = await connect(settings.dsn())
    try:
        items = await review.select_review(conn)
    finally:
        await conn.close()
    gateway = None
    if settings.gateway == "stripe" and settings.stripe_secret_key is not None:
        gateway = gateway_from_settings(settings)
    try:
        asked = await review.ask_the_gateway(gateway, items)
    finally:
        if gateway is not None:
            await gateway.close()
    return [item.public() for item in asked]


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def gateway_review(settings: Settings, *, as_json: bool = False) -> int:
    """Print the operations flagged for review; exit 0."""
    items = asyncio.run(_review(settings))
    if as_json:
        print(json.dumps([{k: _plain(v) for k, v in item.items()} for item in items], indent=2))
        return 0
    if not items:
        print("no charge or refund is flagged for review")
        return 0
    print(f"{len(items)} operation(s) flagged for review (outcome unknown at the gateway):")
    for item in items:
        subject = (
            f"charge of payment {item['payment_id']} ({item['payment_status']})"
            if item["kind"] == "charge"
            else f"refund {item['refund_id']} of payment {item['payment_id']} "
            f"({item['refund_status']})"
        )
        print(  # escaped: the gateway's errors are any text
            printable(
                f"  {subject}: {item['currency']} {item['amount']}, "
                f"{item['intent_id'] or 'no intent recorded'}; {item['checks']} checks, last "
                f"{item['last_error'] or '-'}; the gateway says: {item['gateway_says']}"
            )
        )
    print(
        "decide a payment with `payment-service gateway settle ID SUCCESS|FAILED --reason …` "
        "(or POST /admin/payments/{id}/settlement, or the console's review page), or wait: the "
        "gateway worker asks again every hour",
        file=sys.stderr,
    )
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    return gateway_review(database_settings(), as_json=args.json)


async def _settle(settings: Settings, args: argparse.Namespace) -> int:
    # The API's own settlement, loaded only for this command (it brings the HTTP stack).
    from app import service
    from app.admin import SETTLEMENT_ROUTE
    from app.errors import APIError
    from app.routes import guard_for

    operator = Operator.command_line()
    key = args.idempotency_key or f"cli-settle-{uuid.uuid4()}"
    try:
        model = service.operator_decision(key, args.status, args.reason, args.gateway_reference)
    except APIError as error:
        given = "; ".join(f"{e['field']}: {e['message']}" for e in error.errors or [])
        return fail(f"{error.detail} {given}".strip())
    params = {"payment_id": args.payment_id}
    guard = guard_for(
        key,
        operator.actor,
        SETTLEMENT_ROUTE,
        params,
        model,
        ttl_seconds=settings.idempotency_key_ttl,
    )
    pool = await create_pool(settings.dsn(), min_size=1, max_size=1)
    try:
        outcome = await service.settle_payment(
            pool, args.payment_id, model, guard=guard, operator=operator
        )
    except APIError as error:
        return fail(error.detail, 1)
    finally:
        await pool.close()
    if outcome.status != 200:
        return fail(str(json.loads(outcome.body).get("detail", "refused")), 1)
    payment = json.loads(outcome.body)
    again = " (already, with this idempotency key)" if outcome.replayed else ""
    print(
        printable(
            f"payment {payment['payment_id']} {payment['reference']}: {payment['status']}{again}"
        )
    )
    return 0


def cmd_settle(args: argparse.Namespace) -> int:
    """Decide a PENDING payment; exit 0, 1 when refused (not PENDING, not found, a call to the
    gateway in flight), 2 for bad input."""
    return asyncio.run(_settle(database_settings(), args))


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `gateway` and its actions to the `payment-service` parser."""
    gateway = commands.add_parser(
        "gateway",
        help="The payment gateway's operations.",
        description="The payment gateway's operations.",
    )
    actions = gateway.add_subparsers(dest="gateway_command", metavar="ACTION", required=True)
    review = add_action(
        actions,
        "review",
        cmd_review,
        "Charges and refunds whose outcome at the gateway stayed unknown after "
        "GATEWAY_MAX_CHECKS checks (flagged for review), with what the gateway says about each "
        "now. Decide a payment with `gateway settle` (or POST /admin/payments/{id}/settlement).",
    )
    review.add_argument("--json", action="store_true", help="machine-readable output")
    settle = add_action(
        actions,
        "settle",
        cmd_settle,
        "An operator's decision on a PENDING payment, as POST /admin/payments/{id}/settlement "
        "makes it (its charge waiting at the gateway closed, its event written): check what the "
        "gateway says first (`gateway review`). Recorded in the audit log as payment.settle by "
        "cli:<your operating-system user>.",
    )
    settle.add_argument("payment_id", type=int, metavar="PAYMENT_ID")
    settle.add_argument("status", choices=("SUCCESS", "FAILED"), metavar="SUCCESS|FAILED")
    settle.add_argument(
        "--reason",
        required=True,
        help="why (the audit log's reason; FAILED: also the payment's failure message)",
    )
    settle.add_argument("--gateway-reference", help="the gateway's id of the charge, if known")
    settle.add_argument(
        "--idempotency-key",
        help="run it again with the same key to be sure it settles once (default: a fresh key)",
    )
