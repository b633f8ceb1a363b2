"""`make bench` runs the API's own POST /payments statement, captured from app.payments."""

from __future__ import annotations

from app.payments import INSERT_PAYMENT
from loadtests.bench import pgbench


def test_the_benchmark_captures_the_apis_insert_statement() -> None:
    pgbench.captured_insert.cache_clear()
    sql, args = pgbench.captured_insert()
    assert sql == INSERT_PAYMENT.sql
    assert len(args) == len(INSERT_PAYMENT.names)
    assert all(value in args for value in pgbench.PGBENCH_PER_PAYMENT)
