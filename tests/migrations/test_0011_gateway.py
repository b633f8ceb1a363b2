"""Migration 0011 (money at the gateway) on a database in use: every row written before it stays
valid and reads as it did — answered keys keep their answers, payments gain no failure and reserve
nothing, refunds stay REFUNDED, events keep their types — and the documents gain the gateway's
fields (null)."""

from __future__ import annotations

import json

from payment_cli.check import check_database
from payment_service.migrations import migrate
from tests.migrations.conftest import migrated_before

VERSION = 11


async def test_rows_written_before_the_gateway_stay_valid(empty_database_url: str) -> None:
    async with migrated_before(empty_database_url, VERSION) as conn:
        payment_id = await conn.fetchval(
            """
            INSERT INTO payments (trip_id, amount, currency, method, status, reference,
                                  idempotency_hash, refunded_amount)
            VALUES (7, 20.00, 'INR', 'CARD', 'PARTIALLY_REFUNDED', 'PAY-20260101-00000007',
                    repeat('a', 64), 5.00)
            RETURNING payment_id
            """
        )
        await conn.execute(
            "INSERT INTO payment_refunds (payment_id, amount, idempotency_hash) "
            "VALUES ($1, 5.00, repeat('b', 64))",
            payment_id,
        )
        await conn.execute(
            "INSERT INTO idempotency_keys (key_hash, request_path, request_fingerprint, "
            "response_status, response_data, expires_at) "
            "VALUES (repeat('a', 64), 'POST:/payments', repeat('0', 64), 200, "
            "'{\"payment_id\": 1}', now() + interval '1 day')"
        )
        await conn.execute(
            "INSERT INTO outbox_events (event_type, aggregate_id, payload) "
            "VALUES ('payment.refunded', $1, '{}')",
            payment_id,
        )

        assert VERSION in await migrate(conn)  # and any later migrations

        row = await conn.fetchrow("SELECT * FROM payments WHERE payment_id = $1", payment_id)
        assert (row["reserved_amount"], row["failure_code"], row["event_sequence"]) == (0, None, 1)
        document = json.loads(
            await conn.fetchval("SELECT payment_json(p)::text FROM payments AS p")
        )
        assert document["failure_code"] is None and document["failure_message"] is None
        refund = json.loads(
            await conn.fetchval("SELECT refund_json(r)::text FROM payment_refunds AS r")
        )
        assert refund["status"] == "REFUNDED" and refund["gateway_reference"] is None
        key = await conn.fetchrow("SELECT response_status, response_data FROM idempotency_keys")
        assert key["response_status"] == 200
        # The constraints added NOT VALID hold for the old rows too.
        for table, constraint in (
            ("payments", "payments_reserved_within_amount"),
            ("payments", "payments_event_sequence_check"),
            ("payment_refunds", "payment_refunds_status_check"),
            ("outbox_events", "outbox_events_event_type_check"),
        ):
            await conn.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {constraint}")
        # What `check` says of the gateway's bookkeeping holds for rows that never met one.
        report = await check_database(conn, idempotency_key_ttl=1, outbox_retention_hours=0)
        gateway_checks = {
            "keys_in_progress", "gateway_charges", "gateway_refunds", "refund_reservations"
        }  # fmt: skip
        assert {c.name: c.ok for c in report.checks if c.name in gateway_checks} == dict.fromkeys(
            gateway_checks, True
        )
