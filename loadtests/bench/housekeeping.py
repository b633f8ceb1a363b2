"""Housekeeping beside the API running flat out: the delete rate the relay's housekeeping sustains
while wrk drives POST /payments with every endpoint subscribed, and what it costs the API.

Two runs on one database, the API (the shipped worker count), one relay and a fast receiver for
every endpoint all running:
1. without work for housekeeping: the API's throughput alone (with the relay delivering);
2. after filling the database with deliveries delivered (and events written) long before
   retention, and starting the relay again (a pass starts with the relay): once housekeeping is
   deleting, wrk runs again, and the rows past retention are counted at its start and end.
The rate is rows deleted per second in that window, set beside the deliveries the API wrote per
second (requests times endpoints): housekeeping keeps up when it deletes at least that many.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from .contenders import start_service
from .endpoints import add_endpoints
from .harness import Bench
from .processes import Proc, fmt_cpu, free_port, wait_http
from .relay import local, payments_with_events_sql, start_receiver, start_relay

RETENTION_HOURS = 168
START_TIMEOUT_SECONDS = 60  # for the relay's first pass to begin deleting
# The filled events: 400 hours old, a millisecond apart (deliveries are deleted oldest first).
EVENT_CREATED_AT = "now() - interval '400 hours' + (x.p).payment_id * interval '1 ms'"

# Rows past retention: what housekeeping has left to delete.
OLD_ROWS_SQL = f"""
SELECT (SELECT count(*) FROM deliveries
         WHERE status = 'DELIVERED'
           AND delivered_at < now() - interval '{RETENTION_HOURS} hours')
       || ' ' ||
       (SELECT count(*) FROM outbox_events
         WHERE created_at < now() - interval '{RETENTION_HOURS} hours')
"""


def old_rows(bench: Bench, db: str) -> tuple[int, int]:
    deliveries, events = bench.scalar(db, OLD_ROWS_SQL).split()
    return int(deliveries), int(events)


def fill_past_retention(bench: Bench, db: str, deliveries: int, endpoints: int) -> None:
    """`deliveries` deliveries (one per event and endpoint) delivered 400 hours ago, a
    millisecond apart, with their events and payments: what a week of traffic leaves behind."""
    events = max(deliveries // endpoints, 1)
    bench.pg.psql(
        f"""
        {payments_with_events_sql(events, created_at=EVENT_CREATED_AT)}
        INSERT INTO deliveries (event_id, endpoint_id, aggregate_id, status, created_at,
                                delivered_at)
        SELECT e.id, ep.endpoint_id, e.aggregate_id, 'DELIVERED', e.created_at,
               e.created_at + interval '1 second'
          FROM outbox_events AS e
         CROSS JOIN endpoints AS ep
         WHERE e.created_at < now() - interval '{RETENTION_HOURS} hours'
         ORDER BY e.id, ep.endpoint_id;
        """,
        database=db,
    )
    bench.pg.psql("VACUUM ANALYZE", database=db)


def bench_housekeeping(bench: Bench, workers: int, endpoints: int) -> dict[str, Any]:
    db = "housekeeping"
    dsn = bench.fresh_db(db)
    add_endpoints(bench, db, endpoints)
    receiver, port, _dump = start_receiver(bench, "receiver-housekeeping")
    urls = [local(port)] * endpoints  # one fast receiver answers every endpoint's path
    service, base = start_service(bench, dsn, workers=workers, name="service-housekeeping")
    relay_env = {"OUTBOX_RETENTION_HOURS": str(RETENTION_HOURS)}
    procs: list[Proc] = [receiver, service]

    def relay(index: int) -> Proc:
        metrics_port = free_port()
        proc = start_relay(
            bench,
            dsn,
            urls,
            index,
            extra_env={**relay_env, "RELAY_METRICS_PORT": str(metrics_port)},
        )
        procs.append(proc)
        wait_http(f"http://127.0.0.1:{metrics_port}/metrics", proc)
        return proc

    def groups(current: Proc) -> dict[str, Any]:
        return {
            "server": service.pids,
            "postgres": bench.postgres_pids,
            "relay": current.pids,
            "receiver": receiver.pids,
        }

    try:
        first = relay(0)
        alone, alone_cpu = bench.wrk(
            base + "/payments", bench.args.duration, "hk-alone", groups(first)
        )
        first.stop(signal.SIGTERM)
        filled = bench.args.housekeeping_deliveries
        print(f"  housekeeping: filling {filled:,} deliveries past retention", flush=True)
        fill_past_retention(bench, db, filled, endpoints)
        before_start = old_rows(bench, db)
        second = relay(1)  # its first pass starts now
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while old_rows(bench, db)[0] >= before_start[0]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"housekeeping deleted nothing:\n{second.tail()}")
            time.sleep(0.2)  # sampling the table, not synchronisation
        at_start = old_rows(bench, db)
        started = time.monotonic()
        busy, busy_cpu = bench.wrk(
            base + "/payments", bench.args.duration, "hk-busy", groups(second)
        )
        elapsed = time.monotonic() - started
        at_end = old_rows(bench, db)
    finally:
        for proc in reversed(procs):
            proc.stop(signal.SIGTERM)
    bench.drop_db(db)

    def rps(stats: dict[str, Any]) -> float:
        return float((stats["requests"] - stats["status_errors"]) / (stats["duration_us"] / 1e6))

    result = {
        "workers": workers,
        "endpoints": endpoints,
        "filled": bench.args.housekeeping_deliveries,
        "rps_alone": rps(alone),
        "p99_ms_alone": alone["p99_us"] / 1000,
        "rps_busy": rps(busy),
        "p99_ms_busy": busy["p99_us"] / 1000,
        "written_per_s": rps(busy) * endpoints,  # deliveries the API wrote meanwhile
        "deliveries_deleted_per_s": (at_start[0] - at_end[0]) / elapsed,
        "events_deleted_per_s": (at_start[1] - at_end[1]) / elapsed,
        # Work ran out inside the window: the rate is then a lower bound (fill more).
        "ran_out": at_end[0] == 0,
        "window_s": elapsed,
        "cpu_alone": alone_cpu,
        "cpu": busy_cpu,
    }
    print(
        f"  housekeeping beside the API ({workers} API workers, {endpoints} endpoints): API "
        f"{result['rps_alone']:.0f} req/s alone, {result['rps_busy']:.0f} req/s while "
        f"housekeeping deletes {result['deliveries_deleted_per_s']:,.0f} deliveries/s and "
        f"{result['events_deleted_per_s']:,.0f} events/s (the API wrote "
        f"{result['written_per_s']:,.0f} deliveries/s)"
        + ("; it ran out of work: fill more" if result["ran_out"] else "")
        + f"; cpu {fmt_cpu(busy_cpu)}",
        flush=True,
    )
    return result
