"""`make bench` runs the API's own INSERT through pgbench, captured from the app's code."""

from __future__ import annotations

from loadtests.bench.pgbench import PGBENCH_PER_PAYMENT, captured_insert


def test_the_benchmark_captures_the_apis_insert_with_every_per_payment_argument() -> None:
    captured_insert.cache_clear()
    sql, args = captured_insert()
    assert "INSERT INTO payments" in sql
    assert all(value in args for value in PGBENCH_PER_PAYMENT)
