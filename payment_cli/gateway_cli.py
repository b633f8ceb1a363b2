"""`payment-service gateway review [--json]`: the charges and refunds flagged for review.

An operation is flagged when the gateway worker could not learn its outcome GATEWAY_MAX_CHECKS
times in a row (the gateway down, answers that cannot be read): the payment stays PENDING (or the
refund PENDING) rather than be guessed. This lists each one with what the gateway says about it
now, asked afresh (when a gateway is configured), so that an operator can decide it with POST
/admin/payments/{id}/settlement, or wait for the worker's next hourly check to finish it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from decimal import Decimal
from typing import Any

from payment_cli.actions import add_action
from payment_service.config import Settings
from payment_service.database import connect
from payment_service.entry import database_settings
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
        print(
            f"  {subject}: {item['currency']} {item['amount']}, "
            f"{item['intent_id'] or 'no intent recorded'}; {item['checks']} checks, last "
            f"{item['last_error'] or '-'}; the gateway says: {item['gateway_says']}"
        )
    print(
        "decide a payment with POST /admin/payments/{id}/settlement, or wait: the gateway worker "
        "asks again every hour",
        file=sys.stderr,
    )
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    return gateway_review(database_settings(), as_json=args.json)


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
        "now. Decide a payment with POST /admin/payments/{id}/settlement.",
    )
    review.add_argument("--json", action="store_true", help="machine-readable output")
