"""Relay runs: draining pending deliveries to one or several endpoints, commit-to-callback latency
(alone, and beside an endpoint that is down), the oldest pending delivery under load, alone and
beside endpoints in trouble (the mixed row)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .contenders import start_service
from .endpoints import add_endpoints, endpoint_settings
from .harness import TEMPLATE_DB, Bench
from .load import event_loop_runner, percentile, steady_load
from .paths import BIN, LOADTESTS
from .processes import CpuMeter, Proc, fmt_cpu, free_port, http_json, wait_http

RELAY_TEMPLATE_DB = "bench_relay_template"


def start_receiver(bench: Bench, name: str, *, fail_rate: float = 0.0) -> tuple[Proc, int, Path]:
    port = free_port()
    dump = bench.workdir / f"{name}.jsonl"
    proc = Proc(
        name,
        [
            sys.executable,
            str(LOADTESTS / "receiver.py"),
            "--port",
            str(port),
            "--dump",
            str(dump),
            "--fail-rate",
            str(fail_rate),
        ],
        env=bench.env(),
        logs=bench.logs,
    )
    wait_http(f"http://127.0.0.1:{port}/__stats", proc)
    return proc, port, dump


def start_receivers(bench: Bench, name: str, count: int) -> list[tuple[Proc, int, Path]]:
    return [start_receiver(bench, f"{name}-{i}" if count > 1 else name) for i in range(count)]


def stop_all(procs: list[Proc]) -> list[int | None]:
    return [proc.stop(signal.SIGTERM) for proc in procs]


def start_relay(
    bench: Bench, dsn: str, urls: list[str], index: int, extra_env: dict[str, str] | None = None
) -> Proc:
    """A relay whose seeding points endpoint i (endpoints.ENDPOINT_NAMES) at urls[i]."""
    env = bench.env(
        DATABASE_URL=dsn,
        CALLBACK_SIGNING_SECRET=bench.secret,
        RELAY_METRICS_PORT=str(free_port()),
        **endpoint_settings(urls),
        **{
            k: v
            for k, v in os.environ.items()
            if k.startswith("RELAY_") and k != "RELAY_METRICS_PORT"
        },
    )
    env.update(extra_env or {})
    return Proc(f"relay-{index}", [str(BIN / "payment-service"), "relay"], env=env, logs=bench.logs)


def local(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def pending_deliveries(bench: Bench, db: str, endpoint: str | None = None) -> int:
    where = f" AND endpoint_id = (SELECT endpoint_id FROM endpoints WHERE name = '{endpoint}')"
    return int(
        bench.scalar(
            db,
            "SELECT count(*) FROM deliveries WHERE status = 'PENDING'"
            + (where if endpoint else ""),
        )
    )


# -- relay throughput -----------------------------------------------------------------------------
def relay_template(endpoints: int) -> str:
    return f"{RELAY_TEMPLATE_DB}_{endpoints}"


def payments_with_events_sql(count: int, created_at: str = "now()") -> str:
    """SQL writing `count` successful payments (trips 1 to `count`), each with its
    `payment.succeeded` event created at `created_at` (an SQL expression; `(x.p).payment_id` is
    the payment's id)."""
    return f"""
        INSERT INTO payments (trip_id, amount, currency, method, status, reference,
                              idempotency_hash)
        SELECT g, 150.00, 'INR', 'CARD', 'SUCCESS', 'PAY-20250101-' || lpad(to_hex(g), 8, '0'),
               lpad(to_hex(g), 64, '0')
          FROM generate_series(1, {count}) AS g;
        INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload, created_at)
        SELECT x.event_id, 'payment.succeeded', (x.p).payment_id,
               payment_event_json(x.p, x.event_id, 'payment.succeeded'), {created_at}
          FROM (SELECT p, gen_random_uuid() AS event_id
                  FROM payments AS p
                 WHERE p.trip_id <= {count}) AS x
         ORDER BY (x.p).payment_id;
    """


def build_relay_template(bench: Bench, endpoints: int) -> None:
    """A database with --relay-events pending deliveries in all, spread over `endpoints`
    endpoints: the same work for the relay whatever the number of endpoints."""
    events = bench.args.relay_events // endpoints
    template = relay_template(endpoints)
    bench.pg.psql(f'DROP DATABASE IF EXISTS "{template}"')
    bench.pg.psql(f'CREATE DATABASE "{template}" TEMPLATE "{TEMPLATE_DB}"')
    add_endpoints(bench, template, endpoints)
    bench.pg.psql(
        f"""
        {payments_with_events_sql(events)}
        -- The API's fan-out, as its statement does it: one delivery per subscribed endpoint.
        INSERT INTO deliveries (event_id, endpoint_id, aggregate_id)
        SELECT e.id, ep.endpoint_id, e.aggregate_id
          FROM outbox_events AS e
         CROSS JOIN endpoints AS ep
         ORDER BY e.id, ep.endpoint_id;
        """,
        database=template,
    )
    bench.pg.psql("VACUUM ANALYZE", database=template)


def bench_relay(bench: Bench, processes: int, endpoints: int = 1) -> dict[str, Any]:
    events = bench.args.relay_events // endpoints
    deliveries = events * endpoints
    db = f"relay_{processes}_{endpoints}"
    dsn = bench.fresh_db(db, template=relay_template(endpoints))
    receivers = start_receivers(bench, f"receiver-relay-{processes}x{endpoints}", endpoints)
    relays: list[Proc] = []
    deadline = time.monotonic() + bench.args.relay_timeout
    pending = deliveries
    try:
        started = time.time()
        relays = [
            start_relay(bench, dsn, [local(port) for _, port, _ in receivers], i)
            for i in range(processes)
        ]
        groups: dict[str, Callable[[], set[int]]] = {
            "relay": lambda: set().union(*(r.pids() for r in relays)),
            "postgres": bench.postgres_pids,
            "receiver": lambda: set().union(*(proc.pids() for proc, _, _ in receivers)),
        }
        with CpuMeter(groups) as meter:
            while time.monotonic() < deadline:
                pending = pending_deliveries(bench, db)
                if pending == 0 or not all(r.alive() for r in relays):
                    break
                time.sleep(0.25)  # sampling the backlog, not synchronisation
        finished = time.time()
        stats = [http_json(local(port) + "/__stats") for _, port, _ in receivers]
    finally:
        codes = stop_all(relays)
        stop_all([proc for proc, _, _ in receivers])
    delivered = int(bench.scalar(db, "SELECT count(*) FROM deliveries WHERE status = 'DELIVERED'"))
    bench.drop_db(db)
    received = sum(s["count"] for s in stats)
    firsts = [s["first"] for s in stats if s["first"]]
    lasts = [s["last"] for s in stats if s["last"]]
    window = max(lasts) - min(firsts) if received > 1 else float("nan")
    result = {
        "processes": processes,
        "endpoints": endpoints,
        "events": deliveries,  # deliveries to make, in all endpoints
        "delivered": delivered,
        "pending_left": pending,
        "received": received,
        "unique": sum(s["unique"] for s in stats),
        # Every endpoint got every one of its events: the fewest unique callbacks of one.
        "unique_per_endpoint_min": min(s["unique"] for s in stats),
        "events_per_endpoint": events,
        "wall_s": finished - started,
        "rate_wall": delivered / (finished - started),
        "rate_window": received / window if window == window and window > 0 else 0.0,
        "first_after_s": (min(firsts) - started) if firsts else None,
        "exit_codes": codes,
        "cpu": meter.cores,
        "logs": [str(r.log_path) for r in relays],
    }
    print(
        f"  relay x{processes}, {endpoints} endpoint(s): {delivered}/{deliveries} delivered in "
        f"{result['wall_s']:.1f} s -> {result['rate_wall']:.0f}/s wall, "
        f"{result['rate_window']:.0f}/s first-to-last callback; received {received} "
        f"({result['unique']} unique, at least {result['unique_per_endpoint_min']} of "
        f"{events} per endpoint); exit codes {codes}; cpu {fmt_cpu(meter.cores)}",
        flush=True,
    )
    if delivered < deliveries and relays:
        print("    relay log tail:\n" + relays[0].tail(), flush=True)
    return result


# -- commit-to-callback latency -------------------------------------------------------------------
def enable_commit_timestamps(bench: Bench) -> None:
    """Restart PostgreSQL with track_commit_timestamp=on (exact commit times per row)."""
    setting = "track_commit_timestamp=on"
    if setting not in bench.pg.settings:
        bench.pg.stop()
        bench.pg.settings = (*bench.pg.settings, setting)
        bench.pg.start()


def bench_latency(bench: Bench, workers: int, *, down: bool = False) -> dict[str, Any]:
    """Commit-to-callback latency of endpoint `notification`; with `down`, a second endpoint
    (`trip`, every event type) refuses connections all along, and its deliveries must wait."""
    enable_commit_timestamps(bench)
    db = "latency_down" if down else "latency"
    dsn = bench.fresh_db(db)
    add_endpoints(bench, db, 2 if down else 1)
    receiver, port, dump = start_receiver(bench, f"receiver-{db}")
    service, base = start_service(bench, dsn, workers=workers, name=f"service-{db}")
    # Nothing listens on a fresh free port: connection refused.
    urls = [local(port), local(free_port())] if down else [local(port)]
    relay = start_relay(bench, dsn, urls, 0)
    try:
        time.sleep(1.0)  # let the relay connect and LISTEN; nothing is pending yet
        runner = event_loop_runner()
        sent = runner(
            steady_load(
                base,
                rate=bench.args.rate,
                seconds=bench.args.rate_seconds,
                trip_base=bench.next_trip_base(),
            )
        )
        ok = {
            pid: (t_sent, t_done)
            for pid, t_sent, t_done, status in sent
            if status == 200 and pid is not None
        }
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if http_json(f"http://127.0.0.1:{port}/__stats")["unique"] >= len(ok):
                break
            time.sleep(0.2)
    finally:
        relay.stop(signal.SIGTERM)
        service.stop(signal.SIGTERM)
        receiver.stop(signal.SIGTERM)
    down_pending = pending_deliveries(bench, db, "trip") if down else None
    committed = {
        int(payment_id): float(epoch)
        for payment_id, epoch in (
            line.split("|")
            for line in bench.scalar(
                db,
                "SELECT payment_id, extract(epoch FROM pg_xact_commit_timestamp(xmin))"
                " FROM payments",
            ).splitlines()
            if line
        )
    }
    bench.drop_db(db)
    arrivals: dict[int, float] = {}
    for line in dump.read_text().splitlines():
        record = json.loads(line)
        if record["event_type"] == "payment.succeeded" and record["payment_id"] is not None:
            arrivals.setdefault(int(record["payment_id"]), record["arrival"])
    after_response = [(arrivals[p] - done) * 1000 for p, (_, done) in ok.items() if p in arrivals]
    after_request = [(arrivals[p] - start) * 1000 for p, (start, _) in ok.items() if p in arrivals]
    after_commit = [
        (arrivals[p] - committed[p]) * 1000 for p in ok if p in arrivals and p in committed
    ]
    api_latency = [(done - start) * 1000 for start, done in ok.values()]
    duration = max(t for _, _, t, _ in sent) - min(t for _, t, _, _ in sent) if sent else 1
    result = {
        "rate": bench.args.rate,
        "seconds": bench.args.rate_seconds,
        "sent": len(sent),
        "ok": len(ok),
        "achieved_rate": len(sent) / duration if duration else 0.0,
        "callbacks": len(after_response),
        "after_commit_p50": percentile(after_commit, 50),
        "after_commit_p99": percentile(after_commit, 99),
        "after_commit_max": max(after_commit, default=float("nan")),
        "after_response_p50": percentile(after_response, 50),
        "after_response_p99": percentile(after_response, 99),
        "after_response_max": max(after_response, default=float("nan")),
        "after_request_p50": percentile(after_request, 50),
        "after_request_p99": percentile(after_request, 99),
        "api_p50": percentile(api_latency, 50),
        "api_p99": percentile(api_latency, 99),
        "workers": workers,
        "down": down,
        # The down endpoint's deliveries still waiting when the run ended (none lost).
        "down_pending": down_pending,
    }
    print(
        f"  latency @ {bench.args.rate}/s{', another endpoint down' if down else ''}: "
        f"{len(ok)}/{len(sent)} ok, "
        f"{len(after_response)} callbacks; commit->callback p50 "
        f"{result['after_commit_p50']:.1f} ms p99 {result['after_commit_p99']:.1f} ms; "
        "response->callback p50 "
        f"{result['after_response_p50']:.1f} ms p99 {result['after_response_p99']:.1f} ms; "
        f"request->callback p50 {result['after_request_p50']:.1f} ms p99 "
        f"{result['after_request_p99']:.1f} ms; API p50 {result['api_p50']:.1f} ms"
        + (f"; down endpoint: {down_pending} deliveries pending" if down else ""),
        flush=True,
    )
    return result


# -- oldest pending under full load ---------------------------------------------------------------
PENDING_SQL = """
SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)
  FROM deliveries
 WHERE status = 'PENDING'
"""
SAMPLE_SECONDS = 0.1


class BacklogSampler:
    """Reads a backlog (`sql`: one row, the pending count and the oldest one's age in seconds)
    every SAMPLE_SECONDS in a thread of its own, from `start()` to `stop()`: `samples` holds
    (monotonic time, count, age). `stop()` raises if the sampler failed: no samples must not
    read as "no backlog"."""

    def __init__(self, dsn: str, sql: str, params: tuple[Any, ...] = ()) -> None:
        self.dsn, self.sql, self.params = dsn, sql, params
        self.samples: list[tuple[float, int, float]] = []
        self._failures: list[Exception] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self._failures:
            raise RuntimeError(f"the backlog sampler failed: {self._failures[0]!r}")

    def _run(self) -> None:
        try:
            self._sample()
        except Exception as error:  # reported by stop()
            self._failures.append(error)

    def _sample(self) -> None:
        import psycopg2

        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            while not self._stop.is_set():
                cur.execute(self.sql, self.params)
                count, age = cur.fetchone()
                self.samples.append((time.monotonic(), int(count), float(age)))
                self._stop.wait(SAMPLE_SECONDS)
        conn.close()


def under_load(stats: dict[str, Any], sampler: BacklogSampler, load_end: float) -> dict[str, Any]:
    """The API's throughput and p99 under wrk, and the backlog sampled meanwhile: the oldest
    pending delivery's age (p50, p99, max) and the most pending."""
    during = [s for s in sampler.samples if s[0] <= load_end]
    ages = [s[2] for s in during]
    return {
        "rps": (stats["requests"] - stats["status_errors"]) / (stats["duration_us"] / 1e6),
        "p99_ms": stats["p99_us"] / 1000,
        "age_max_s": max(ages, default=float("nan")),
        "age_p50_s": percentile(ages, 50),
        "age_p99_s": percentile(ages, 99),
        "pending_max": max((s[1] for s in during), default=0),
        "samples": len(during),
    }


def bench_pending(bench: Bench, workers: int, relays: int) -> dict[str, Any]:
    db = "pending"
    dsn = bench.fresh_db(db)
    receiver, port, _dump = start_receiver(bench, "receiver-pending")
    service, base = start_service(bench, dsn, workers=workers, name="service-pending")
    relay_procs = [start_relay(bench, dsn, [local(port)], i) for i in range(relays)]
    sampler = BacklogSampler(dsn, PENDING_SQL)
    try:
        time.sleep(1.0)  # the relay connects and LISTENs
        sampler.start()
        stats, cores = bench.wrk(
            base + "/payments",
            bench.args.duration,
            "pending",
            {
                "server": service.pids,
                "postgres": bench.postgres_pids,
                "relay": lambda: set().union(*(r.pids() for r in relay_procs)),
                "receiver": receiver.pids,
            },
        )
        load_end = time.monotonic()
        drained_at = None
        deadline = load_end + 60
        while time.monotonic() < deadline:
            samples = sampler.samples
            if samples and samples[-1][0] > load_end and samples[-1][1] == 0:
                drained_at = samples[-1][0]
                break
            time.sleep(0.1)
    finally:
        try:
            sampler.stop()
        finally:
            for proc in relay_procs:
                proc.stop(signal.SIGTERM)
            service.stop(signal.SIGTERM)
            receiver.stop(signal.SIGTERM)
            bench.drop_db(db)
    result = {
        "workers": workers,
        "relays": relays,
        **under_load(stats, sampler, load_end),
        "drain_after_load_s": (drained_at - load_end) if drained_at else None,
        "cpu": cores,
    }
    print(
        f"  oldest pending under load ({workers} API workers, {relays} relay): "
        f"{result['rps']:.0f} req/s; age p50 {result['age_p50_s']:.3f} s, p99 "
        f"{result['age_p99_s']:.3f} s, max {result['age_max_s']:.3f} s; pending max "
        f"{result['pending_max']}; cpu {fmt_cpu(cores)}",
        flush=True,
    )
    return result


# -- the mixed row: healthy endpoints beside a flapping and a refusing one ------------------------
HEALTHY = ("notification", "trip")
FLAPPING = "driver"  # answers 500 to half its callbacks, drawn at random
REFUSING = "rider"  # its URL is a port nothing listens on
DRAIN_SHARE = 0.75  # of the replayed backlog: the flapping endpoint's drain rate is measured on it

# The healthy endpoints' pending deliveries and the oldest one's age. Cheap while they keep up:
# it reads only their pending rows, never the flapping or the refusing endpoint's backlog.
HEALTHY_BACKLOG_SQL = """
SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(d.created_at)), 0)
  FROM deliveries AS d
  JOIN endpoints AS ep ON ep.endpoint_id = d.endpoint_id
 WHERE ep.name = ANY (%s)
   AND d.status = 'PENDING'
"""


def replay_everything(bench: Bench, dsn: str, endpoint: str, since: str) -> None:
    """`payment-service outbox replay --endpoint ENDPOINT --since SINCE`: every event from then
    on goes to the endpoint again."""
    result = subprocess.run(
        [
            str(BIN / "payment-service"),
            "outbox",
            "replay",
            "--endpoint",
            endpoint,
            "--since",
            since,
        ],
        env=bench.env(DATABASE_URL=dsn),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"outbox replay failed: {result.stderr[-2000:]}")


def bench_mixed(bench: Bench, workers: int) -> dict[str, Any]:
    """The healthy endpoints' oldest pending delivery while the API runs flat out, four endpoints
    subscribed to every event: two healthy, one answering 500 to half its callbacks (`driver`),
    one refusing connections (`rider`); then how fast `driver` drains a backlog once the load
    stops: every event of the load is sent to it again (`outbox replay --endpoint driver
    --since <the load's start>`, as an operator would after an outage), and the callbacks its
    receiver answers 200 are counted per second until three quarters of that backlog arrived (or
    --mixed-drain-seconds pass)."""
    db = "mixed"
    dsn = bench.fresh_db(db)
    add_endpoints(bench, db, 4)
    healthy = [start_receiver(bench, f"receiver-mixed-{name}") for name in HEALTHY]
    flapping, flapping_port, _ = start_receiver(bench, f"receiver-mixed-{FLAPPING}", fail_rate=0.5)
    urls = [local(port) for _, port, _ in healthy] + [local(flapping_port), local(free_port())]
    service, base = start_service(bench, dsn, workers=workers, name="service-mixed")
    relay = start_relay(bench, dsn, urls, 0)
    receivers = [proc for proc, _, _ in healthy] + [flapping]
    sampler = BacklogSampler(dsn, HEALTHY_BACKLOG_SQL, (list(HEALTHY),))

    def accepted() -> tuple[float, int]:
        """Callbacks the flapping endpoint's receiver answered 200 so far."""
        return time.monotonic(), http_json(local(flapping_port) + "/__stats")["count"]

    try:
        time.sleep(1.0)  # the relay connects, seeds the endpoints' URLs and LISTENs
        load_start = bench.scalar(
            db, """SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')"""
        )
        sampler.start()
        stats, cores = bench.wrk(
            base + "/payments",
            bench.args.duration,
            "mixed",
            {
                "server": service.pids,
                "postgres": bench.postgres_pids,
                "relay": relay.pids,
                "receiver": lambda: set().union(*(proc.pids() for proc in receivers)),
            },
        )
        load_end = time.monotonic()
        sampler.stop()
        left = pending_deliveries(bench, db, FLAPPING)
        replay_everything(bench, dsn, FLAPPING, load_start)
        backlog = pending_deliveries(bench, db, FLAPPING)
        # The drain's rate: until three quarters of the backlog arrived, or --mixed-drain-seconds
        # passed. (With half the tries failing, one attempt in eight fails all three of its tries
        # and waits out a durable retry, 5 s: the rest of the backlog measures that schedule.)
        drain_start = drain_end = accepted()
        deadline = drain_start[0] + bench.args.mixed_drain_seconds
        while drain_end[0] < deadline and drain_end[1] - drain_start[1] < DRAIN_SHARE * backlog:
            time.sleep(0.2)  # sampling a count, not synchronisation
            drain_end = accepted()
        refused_pending = pending_deliveries(bench, db, REFUSING)
    finally:
        try:
            sampler.stop()
        finally:
            relay.stop(signal.SIGTERM)
            service.stop(signal.SIGTERM)
            stop_all(receivers)
            bench.drop_db(db)
    drained = drain_end[1] - drain_start[1]
    result = {
        "workers": workers,
        **under_load(stats, sampler, load_end),
        "flapping_left": left,  # pending at the end of the load
        "flapping_backlog": backlog,  # pending once the load's events were replayed to it
        "flapping_drained": drained,
        "flapping_drain_per_s": drained / (drain_end[0] - drain_start[0]),
        "refused_pending": refused_pending,
        "cpu": cores,
    }
    print(
        f"  mixed ({workers} API workers, 1 relay; {FLAPPING} answers 500 to half, {REFUSING} "
        f"refuses): {result['rps']:.0f} req/s; healthy endpoints' oldest pending p50 "
        f"{result['age_p50_s']:.3f} s, p99 {result['age_p99_s']:.3f} s, max "
        f"{result['age_max_s']:.3f} s, pending max {result['pending_max']}; {FLAPPING}: "
        f"{left} pending at the end of the load, a backlog of {backlog} replayed, "
        f"{drained} delivered at {result['flapping_drain_per_s']:.0f}/s; {REFUSING}: "
        f"{refused_pending} pending; "
        f"cpu {fmt_cpu(cores)}",
        flush=True,
    )
    return result
