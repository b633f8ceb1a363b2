"""Does the money in our database agree with the money at the gateway? Both ways.

`assert_money_consistent(database_url, gateway_base_url)` reads our payments, refunds and gateway
operations, and everything the gateway holds (`read_ledger`, the tests' own HTTP client, never the
adapter under test), and asserts:

- ours -> the gateway's: every payment charged at the gateway has **at most one confirmed intent**
  (and at most one that moved or is moving money); a decided success has exactly one succeeded
  intent, the one recorded, for the payment's amount; a `FAILED` payment has none that the
  gateway charged; every refund has **at most one gateway refund**, exactly one succeeded for its
  amount when `REFUNDED`, none when `FAILED`; the refunds succeeded at the gateway add up to the
  payment's `refunded_amount`; a payment or refund still `PENDING` is flagged for review (its
  operation in `REVIEW`) — nothing is left undecided and unflagged;
- the gateway's -> ours: every intent carries the reference of one of our payments (an intent
  never confirmed is an orphan of a lost create answer, counted, allowed), a charged one is that
  payment's recorded intent; every gateway refund is one of our refunds, of that payment.

The gateway must be this database's alone (the fault tests start one per test), so that
everything it holds is ours. Then it runs `payment-service reconcile --since <the first payment's
time> --json` and expects exit 0 (no difference; `Counts.reconcile` records it). Returns what
was counted, for the fault tests' report (tests/support/fault_report.py).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from payment_service.gateway.amounts import to_minor_units
from tests.support.commands import run_to_end
from tests.support.environment import clean_env
from tests.support.gateway import GatewayLedger, gateway_settings, read_ledger

SUCCEEDED = ("SUCCESS", "PARTIALLY_REFUNDED", "REFUNDED")
# A charge of an intent that moved money or is moving it.
MOVING = ("succeeded", "pending")


@dataclass(frozen=True)
class Counts:
    """What one comparison counted (one row of the fault tests' report)."""

    payments: int  # charged at the gateway (ours)
    intents_created: int  # at the gateway
    intents_confirmed: int  # at the gateway: a charge was attempted through them
    orphan_intents: int  # created, never confirmed (a create whose answer was lost)
    refunds_at_gateway: int
    review_flagged: int  # operations in REVIEW
    failed_payments: int
    reconcile: str  # "exit 0": what `payment-service reconcile` answered

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def assert_money_consistent(
    database_url: str, gateway_base_url: str, *, workdir: Path | None = None
) -> Counts:
    """See the module. Raises AssertionError listing every difference found."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        payments = await conn.fetch(
            """
            SELECT p.payment_id, p.reference, p.amount, p.currency, p.status, p.refunded_amount,
                   p.reserved_amount, p.gateway_reference, p.created_at,
                   o.phase, o.intent_id
              FROM payments AS p
              JOIN gateway_operations AS o ON o.payment_id = p.payment_id AND o.kind = 'CHARGE'
             ORDER BY p.payment_id
            """
        )
        refunds = await conn.fetch(
            """
            SELECT r.refund_id, r.payment_id, r.amount, r.status, r.gateway_refund_id, o.phase
              FROM payment_refunds AS r
              JOIN gateway_operations AS o ON o.refund_id = r.refund_id AND o.kind = 'REFUND'
             ORDER BY r.refund_id
            """
        )
        review = await conn.fetchval(
            "SELECT count(*) FROM gateway_operations WHERE phase = 'REVIEW'"
        )
        first = await conn.fetchval("SELECT min(created_at) FROM payments")
    finally:
        await conn.close()
    ledger = await read_ledger(gateway_base_url)
    problems = _compare(payments, refunds, ledger)
    assert not problems, (
        f"{len(problems)} difference(s) between our database and the gateway:\n"
        + "\n".join(problems[:20])
    )
    reconcile = await asyncio.to_thread(
        _run_reconcile, database_url, gateway_base_url, first, workdir
    )
    return Counts(
        payments=len(payments),
        intents_created=len(ledger.intents),
        intents_confirmed=ledger.confirmed_intents,
        orphan_intents=sum(1 for i in ledger.intents if not i.get("latest_charge")),
        refunds_at_gateway=len(ledger.refunds),
        review_flagged=int(review),
        failed_payments=sum(1 for p in payments if p["status"] == "FAILED"),
        reconcile=reconcile,
    )


def _compare(
    payments: list[asyncpg.Record], refunds: list[asyncpg.Record], ledger: GatewayLedger
) -> list[str]:
    problems: list[str] = []
    by_reference = {p["reference"]: p for p in payments}
    intents_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for intent in ledger.intents:
        reference = intent["metadata"].get("reference")
        owner = by_reference.get(reference)
        if owner is None:
            problems.append(
                f"intent {intent['id']} (reference {reference!r}) is no payment of ours"
            )
            continue
        if intent["metadata"].get("payment_id") != str(owner["payment_id"]):
            problems.append(f"intent {intent['id']} names another payment id than {reference}'s")
        intents_of[reference].append(intent)
    refunds_by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    ours = {str(r["refund_id"]): r for r in refunds}
    for refund in ledger.refunds:
        refund_id = refund["metadata"].get("refund_id")
        mine = ours.get(refund_id)
        if mine is None:
            problems.append(f"gateway refund {refund['id']} (refund_id {refund_id!r}) is not ours")
            continue
        if refund["metadata"].get("payment_id") != str(mine["payment_id"]):
            problems.append(f"gateway refund {refund['id']} names another payment than ours")
        refunds_by_id[refund_id].append(refund)

    refunded_at_gateway: dict[int, int] = defaultdict(int)
    for r in refunds:
        payment = next(p for p in payments if p["payment_id"] == r["payment_id"])
        made = refunds_by_id.get(str(r["refund_id"]), [])
        succeeded = [g for g in made if g["status"] == "succeeded"]
        refunded_at_gateway[r["payment_id"]] += sum(int(g["amount"]) for g in succeeded)
        name = f"refund {r['refund_id']} (payment {r['payment_id']}, {r['status']})"
        if len(made) > 1:
            problems.append(f"{name}: {len(made)} refunds at the gateway")
        if r["status"] == "REFUNDED":
            minor = to_minor_units(r["amount"], payment["currency"])
            if len(succeeded) != 1 or int(succeeded[0]["amount"]) != minor:
                problems.append(f"{name}: the gateway refunded {[g['amount'] for g in made]}")
            elif succeeded[0]["id"] != r["gateway_refund_id"]:
                problems.append(f"{name}: records {r['gateway_refund_id']}, not {made[0]['id']}")
        elif r["status"] == "FAILED" and succeeded:
            problems.append(f"{name}: FAILED while the gateway refunded it")
        elif r["status"] == "PENDING" and r["phase"] != "REVIEW":
            problems.append(f"{name}: undecided and not flagged for review ({r['phase']})")

    for p in payments:
        name = f"payment {p['payment_id']} ({p['reference']}, {p['status']}, {p['phase']})"
        intents = intents_of.get(p["reference"], [])
        confirmed = [i for i in intents if i.get("latest_charge")]
        moving = [i for i in confirmed if i["latest_charge"]["status"] in MOVING]
        if len(confirmed) > 1:
            problems.append(f"{name}: {len(confirmed)} confirmed intents at the gateway")
        if len(moving) > 1:
            problems.append(f"{name}: charged {len(moving)} times at the gateway")
        for intent in moving:
            if intent["id"] != p["intent_id"]:
                problems.append(f"{name}: charged through {intent['id']}, not its recorded intent")
        if p["status"] in SUCCEEDED:
            won = [i for i in intents if i["status"] == "succeeded"]
            minor = to_minor_units(p["amount"], p["currency"])
            if len(won) != 1:
                problems.append(f"{name}: {len(won)} succeeded intents at the gateway")
            elif won[0]["id"] != p["gateway_reference"] or int(won[0]["amount"]) != minor:
                problems.append(f"{name}: the gateway charged {won[0]['id']} {won[0]['amount']}")
            if p["phase"] != "DONE":
                problems.append(f"{name}: decided but its operation is {p['phase']}")
        elif p["status"] == "FAILED":
            if moving:
                problems.append(f"{name}: FAILED while the gateway charged it")
            if p["phase"] != "DONE":
                problems.append(f"{name}: decided but its operation is {p['phase']}")
        elif p["phase"] != "REVIEW":
            problems.append(f"{name}: undecided and not flagged for review")
        refunded = _minor(p["refunded_amount"], p["currency"])
        if refunded_at_gateway[p["payment_id"]] != refunded:
            problems.append(
                f"{name}: refunded {p['refunded_amount']} here, "
                f"{refunded_at_gateway[p['payment_id']]} minor units at the gateway"
            )
    return problems


def _minor(amount: Decimal, currency: str) -> int:
    return 0 if amount == 0 else to_minor_units(amount, currency)


def _run_reconcile(
    database_url: str, gateway_base_url: str, first: datetime | None, workdir: Path | None
) -> str:
    since = (first or datetime.now().astimezone()) - timedelta(minutes=5)
    env = clean_env(
        environment="test",
        log_level="WARNING",
        database_url=database_url,
        **gateway_settings(gateway_base_url),
    )
    finished = run_to_end(
        ["reconcile", "--since", since.isoformat(), "--json"], env, workdir or Path.cwd()
    )
    assert finished.returncode == 0, (
        f"payment-service reconcile exited {finished.returncode}:\n"
        f"{finished.stdout[-4000:]}\n{finished.stderr[-2000:]}"
    )
    return "exit 0"
