"""pgbench running the API's own POST /payments statement: the database's ceiling."""

from __future__ import annotations

import functools
import json
import re
import subprocess
from typing import TYPE_CHECKING, Any

from .load import HttpResult, percentile
from .paths import REPORTS
from .processes import CpuMeter, children_cpu_seconds, fmt_cpu

if TYPE_CHECKING:
    from .harness import Bench

PGBENCH_VARIANTS = {
    "service": "the API's statement, as sent",
    "notify_after_commit": "same + a pg_notify transaction after each commit",
    "notify_in_transaction": "same with pg_notify inside the transaction",
    "no_notify": "same without any pg_notify",
}
# Recognisable values for the arguments that must differ per payment; every other argument is a
# constant of the benchmark's payment (150.00 INR by CARD).
SENT_KEY_HASH = "5e" * 32
SENT_LOCK_ID = 0x5E5E5E5E5E5E5E
SENT_TRIP = 5_555_555_555_555
SENT_SUFFIX = "5e5e5e5e"
SENT_FINGERPRINT = "c0ffee00" * 8
# What the per-payment arguments become in pgbench: derived from two random numbers per
# transaction, so keys, trips and references never repeat.
PGBENCH_PER_PAYMENT = {
    SENT_KEY_HASH: "lpad(to_hex(:trip::bigint), 64, '0')::char(64)",
    SENT_LOCK_ID: ":lock_id",
    SENT_TRIP: ":trip",
    SENT_SUFFIX: "to_hex(:trip::bigint)",
}


@functools.cache
def captured_insert() -> tuple[str, tuple[Any, ...]]:
    """The statement and arguments app/payments.py insert_payment sends for one payment.

    Captured by calling the real function with a connection that records instead of sending, so
    the benchmark follows the API's SQL however it is composed or numbered.
    """
    import inspect
    from decimal import Decimal

    from app import payments
    from app.idempotency import Guard, IdempotencyKey
    from payment_service.config import DEFAULT_CALLER

    class Captured(Exception):
        pass

    class Recorder:
        sent: tuple[str, tuple[Any, ...]]

        async def fetchrow(self, sql: str, *args: Any) -> None:
            self.sent = (sql, args)
            raise Captured

    candidates: dict[str, Any] = {
        "guard": Guard(
            IdempotencyKey(SENT_KEY_HASH, DEFAULT_CALLER, SENT_LOCK_ID),
            "POST:/payments",
            SENT_FINGERPRINT,
            86400,
        ),
        "trip_id": SENT_TRIP,
        "amount": Decimal("150.00"),
        "currency": "INR",
        "method": "CARD",
        "status": "SUCCESS",
        "metadata": {"note": "bench"},
        "extra_fields": {},
        "response_status": 200,
    }
    wanted = [n for n in inspect.signature(payments.insert_payment).parameters if n != "conn"]
    unknown = [n for n in wanted if n not in candidates]
    if unknown:
        raise RuntimeError(f"insert_payment takes {unknown} now: update captured_insert")
    recorder = Recorder()
    original = payments.new_reference_suffix
    payments.new_reference_suffix = lambda: SENT_SUFFIX
    # Driven by hand, not by an event loop (the floor app captures while Uvicorn's loop runs):
    # the recorder raises at the first await.
    call = payments.insert_payment(recorder, **{n: candidates[n] for n in wanted})
    try:
        call.send(None)
    except Captured:
        pass
    finally:
        call.close()
        payments.new_reference_suffix = original
    sql, args = recorder.sent
    missing = [v for v in PGBENCH_PER_PAYMENT if v not in args]
    if missing:
        raise RuntimeError(f"insert_payment no longer sends {missing}: update captured_insert")
    return sql, args


def pgbench_script(variant: str) -> tuple[str, dict[str, str]]:
    """A pgbench script running the API's POST /payments statement, and its -D variables."""
    from payment_service import OUTBOX_CHANNEL

    sql, args = captured_insert()
    expressions: dict[int, str] = {}
    defines = {"channel": OUTBOX_CHANNEL}
    for number, value in enumerate(args, start=1):
        if isinstance(value, (str, int)) and value in PGBENCH_PER_PAYMENT:
            expressions[number] = PGBENCH_PER_PAYMENT[value]
        elif value is None:
            expressions[number] = "NULL"
        else:
            # A -D variable: pgbench sends it as a parameter of the one prepared statement,
            # typed by the server exactly as asyncpg's are.
            defines[f"p{number}"] = (
                json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            )
            expressions[number] = f":p{number}"
    if variant != "service":  # every variant starts from the statement without a NOTIFY
        sql = re.sub(r"pg_notify\(\$\d+, ''\)", "NULL", sql)
    sql = re.sub(r"\$(\d+)\b", lambda m: expressions[int(m.group(1))], sql)
    if variant == "notify_in_transaction":
        answer = "(SELECT body FROM answer) AS body"
        if answer not in sql:
            raise RuntimeError("insert_payment's final SELECT changed: update pgbench_script")
        sql = sql.replace(
            answer,
            answer + ",\n               (SELECT pg_notify(:channel, '') FROM answer) AS notified",
        )
    lines = [
        "-- Generated by loadtests/bench from app/payments.py insert_payment "
        f"(variant: {variant}).",
        "\\set trip random(1, 9000000000000000000)",
        "\\set lock_id random(1, 4000000000000000000)",
        sql.strip() + ";",
    ]
    if variant == "notify_after_commit":
        lines.append("SELECT pg_notify(:channel, '');")
    return "\n".join(lines) + "\n", defines


def bench_pgbench(bench: Bench, variant: str) -> HttpResult:
    db = "pgbench_" + variant
    bench.fresh_db(db)
    REPORTS.mkdir(parents=True, exist_ok=True)
    script = REPORTS / f"pgbench-{variant}.sql"
    sql, defines = pgbench_script(variant)
    script.write_text(sql, encoding="utf-8")
    base = [
        str(bench.pg.bin_dir / "pgbench"),
        "-n",
        "-M",
        "prepared",
        "-h",
        "127.0.0.1",
        "-p",
        str(bench.pg.port),
        "-U",
        "postgres",
        "-c",
        str(bench.args.connections),
        "-j",
        "2",
        "-f",
        str(script),
        *(f"-D{k}={v}" for k, v in defines.items()),
    ]
    subprocess.run(
        [*base, "-T", str(max(1, round(bench.args.warmup))), db],
        check=True,
        capture_output=True,
        timeout=bench.args.warmup + 60,
    )
    bench.pg.psql("CHECKPOINT")
    log_dir = bench.workdir / f"pgbench-{variant}"
    log_dir.mkdir()
    cmd = [
        *base,
        "-T",
        str(max(1, round(bench.args.duration))),
        "-l",
        "--log-prefix",
        str(log_dir / "log"),
        db,
    ]
    before = children_cpu_seconds()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with CpuMeter({"postgres": bench.postgres_pids}) as meter:
        out, _ = proc.communicate(timeout=bench.args.duration + 60)
    meter.add("pgbench", children_cpu_seconds() - before)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed:\n{out[-2000:]}")
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    failed = re.search(r"number of failed transactions: (\d+)", out)
    latencies = [
        int(line.split()[2]) / 1000
        for log in log_dir.glob("log*")
        for line in log.read_text().splitlines()
        if line.strip()
    ]
    rows = bench.scalar(db, "SELECT count(*) FROM payments")
    bench.drop_db(db)
    result = HttpResult(
        fsync=bench.fsync,
        name="pgbench (DB ceiling)",
        kind="pgbench",
        config=PGBENCH_VARIANTS[variant],
        rps=tps,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        requests=len(latencies),
        errors=int(failed.group(1)) if failed else 0,
        cpu={**meter.cores, "generator": meter.cores.get("pgbench", 0.0)},
        note="" if int(rows) >= len(latencies) else "fewer payment rows than transactions",
    )
    print(
        f"  pgbench {variant:<28} {tps:8.0f} tps    p50 {result.p50_ms:6.1f} ms  "
        f"p99 {result.p99_ms:6.1f} ms  failed {result.errors}  cpu {fmt_cpu(meter.cores)}",
        flush=True,
    )
    return result
