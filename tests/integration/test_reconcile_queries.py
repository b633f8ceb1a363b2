"""EXPLAIN of what reconciliation reads of ours, over a year of operations at the gateway: the
charges and refunds staged in the window, those the gateway's objects name, and (scheduled runs)
those decided since the window's start are found through indexes, never by reading
gateway_operations, payments or payment_refunds in full."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from payment_service.money import reconcile
from tests.integration.test_console_queries import _at_the_gateway, _plan
from tests.support.database import insert_events


@pytest.mark.parametrize("scheduled", [True, False], ids=["scheduled", "by hand"])
async def test_reconciliations_statements_read_through_indexes(
    db: asyncpg.Connection, scheduled: bool
) -> None:
    await insert_events(db, payments=20_000, events_per_payment=1)
    await _at_the_gateway(db)
    # Staged and decided over the last year, a few an hour.
    await db.execute(
        "UPDATE gateway_operations"
        "   SET created_at = now() - (operation_id % 20000) * interval '26 minutes',"
        "       updated_at = now() - (operation_id % 20000) * interval '26 minutes'"
        "                    + interval '1 minute'"
    )
    await db.execute("ANALYZE")
    until = datetime.now(UTC)
    since = until - timedelta(hours=1)
    decided_since = since if scheduled else None
    some = await db.fetch("SELECT payment_id, refund_id FROM payment_refunds LIMIT 5")
    window = {"since": since, "until": until, "decided_since": decided_since}
    charges, refunds = reconcile.CHARGES, reconcile.REFUNDS
    payment_ids = [row["payment_id"] for row in some]
    refund_ids = [row["refund_id"] for row in some]
    plans = {
        "charges": await _plan(db, charges.sql, *charges.args(**window, payment_ids=payment_ids)),
        "refunds": await _plan(db, refunds.sql, *refunds.args(**window, refund_ids=refund_ids)),
    }
    for name, plan in plans.items():
        for table in ("gateway_operations", "payments", "payment_refunds"):
            assert f"Seq Scan on {table}" not in plan, f"{name}:\n{plan}"
        assert "gateway_operations_created_idx" in plan, f"{name}:\n{plan}"
        if scheduled:
            assert "gateway_operations_decided_idx" in plan, f"{name}:\n{plan}"
    assert "gateway_operations_one_charge_per_payment" in plans["charges"], plans["charges"]
    assert "gateway_operations_one_per_refund" in plans["refunds"], plans["refunds"]
