"""How long the operator console's pages take with a million deliveries in the database.

`python -m loadtests.console_pages [--database-url URL] [--deliveries N] [--requests N]`: makes
a fresh database on the PostgreSQL server at URL (default: DATABASE_URL's server), migrates it,
fills it as a busy service leaves it — N deliveries (default 1,000,000) over four endpoints, one
event per payment to each, nearly all delivered, some pending and some dead with their attempt
logs, every payment charged at the gateway with a webhook (one in a thousand flagged for review,
one in a hundred refunded there), and 100,000 audit entries — then starts `payment-service
serve` on it with an admin key, signs in to the console and asks for each page `--requests`
times, printing the median and the slowest answer of each. The database is dropped at the end
unless `--keep`.

A measurement to run by hand (docs/benchmarks.md records one), never a timed test: the figures
depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from payment_service.embedded import free_port

ROOT = Path(__file__).resolve().parents[1]
DATABASE = "console_pages"
TOKEN = "console-pages-bench-admin-token-3c1f9a"  # a local run's own admin key
ENDPOINTS = ("notification", "trip", "driver", "rider")
AUDIT_ENTRIES = 100_000
START_TIMEOUT_SECONDS = 60

# Payments with one payment.succeeded event each; one delivery of each event per endpoint: 98 %
# delivered (one attempt), 1 % pending (failed three times, due later), 1 % dead (twelve failed
# attempts); the newest events are the pending ones, as on a service whose receiver fails now.
FILL_SQL = string.Template(
    """
INSERT INTO endpoints (name, url, event_types)
SELECT name, 'http://127.0.0.1:9/' || name, '{*}'
  FROM unnest($endpoints::text[]) AS name
    ON CONFLICT (name) DO UPDATE SET url = excluded.url;

INSERT INTO payments (trip_id, amount, currency, method, status, reference, idempotency_hash)
SELECT g, 150.00, 'INR', 'CARD', 'SUCCESS', 'PAY-20250101-' || lpad(to_hex(g), 8, '0'),
       lpad(to_hex(g), 64, '0')
  FROM generate_series(1, $payments) AS g;

INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload, created_at)
SELECT gen_random_uuid(), 'payment.succeeded', p.payment_id,
       payment_event_json(p, gen_random_uuid(), 'payment.succeeded'),
       now() - make_interval(secs => ($payments - p.payment_id) * 0.5)
  FROM payments AS p
 ORDER BY p.payment_id;

INSERT INTO deliveries (event_id, endpoint_id, aggregate_id, status, attempts, counted_attempts,
                        next_attempt_at, last_status_code, last_error, last_attempt_at,
                        attempt_log, created_at, delivered_at)
SELECT e.id, n.endpoint_id, e.aggregate_id, s.status, s.attempts, s.attempts,
       e.created_at + interval '1 hour',
       CASE WHEN s.status = 'DELIVERED' THEN NULL ELSE 503 END,
       CASE WHEN s.status = 'DELIVERED' THEN NULL ELSE 'HTTP 503: upstream busy' END,
       e.created_at + interval '1 second',
       (SELECT jsonb_agg(jsonb_build_object(
                   'attempt', a, 'at', e.created_at + make_interval(secs => a),
                   'outcome', CASE WHEN s.status = 'DELIVERED' THEN 'DELIVERED'
                                   WHEN a = s.attempts THEN s.status ELSE 'PENDING' END,
                   'status_code', CASE WHEN s.status = 'DELIVERED' THEN 200 ELSE 503 END,
                   'error', CASE WHEN s.status = 'DELIVERED' THEN NULL
                                 ELSE 'HTTP 503: upstream busy' END,
                   'tries', 1, 'duration_ms', 12, 'signed_with', '0123456789ab'))
          FROM generate_series(1, s.attempts) AS a),
       e.created_at,
       CASE WHEN s.status = 'DELIVERED' THEN e.created_at + interval '1 second' END
  FROM outbox_events AS e
 CROSS JOIN endpoints AS n
 CROSS JOIN LATERAL (
        SELECT CASE WHEN e.aggregate_id > $payments * 0.99 THEN 'PENDING'
                    WHEN e.aggregate_id % 100 = 7 THEN 'DEAD'
                    ELSE 'DELIVERED' END AS status) AS c
 CROSS JOIN LATERAL (
        SELECT c.status,
               CASE c.status WHEN 'PENDING' THEN 3 WHEN 'DEAD' THEN 12 ELSE 1 END AS attempts) AS s
 WHERE n.name = ANY ($endpoints::text[])
 ORDER BY e.id, n.endpoint_id;

-- Every payment charged at the gateway (its intent pi_<id>) with one webhook; every hundredth
-- refunded there (re_<id>); every thousandth charge flagged for review.
INSERT INTO gateway_operations (kind, payment_id, phase, key_hash, caller, intent_id, outcome)
SELECT 'CHARGE', payment_id, CASE WHEN payment_id % 1000 = 3 THEN 'REVIEW' ELSE 'DONE' END,
       idempotency_hash, 'default', 'pi_' || payment_id, 'success'
  FROM payments;

INSERT INTO payment_refunds (payment_id, amount, idempotency_hash, gateway_refund_id)
SELECT payment_id, 1.00, idempotency_hash, 're_' || payment_id
  FROM payments
 WHERE payment_id % 100 = 11;

INSERT INTO gateway_operations
       (kind, payment_id, refund_id, phase, key_hash, caller, intent_id, gateway_refund_id)
SELECT 'REFUND', payment_id, refund_id, 'DONE', idempotency_hash, 'default',
       'pi_' || payment_id, 're_' || payment_id
  FROM payment_refunds;

INSERT INTO gateway_events (event_id, gateway_type, object_id, payment_id, outcome, created_at)
SELECT 'evt_' || payment_id, 'payment_intent.succeeded', 'pi_' || payment_id, payment_id,
       'applied', created_at
  FROM payments;

INSERT INTO audit_log (at, actor, action, target_kind, target_id, origin, before, after)
SELECT now() - make_interval(secs => $audit - g),
       CASE WHEN g % 10 = 0 THEN 'cli:alice' ELSE 'admin:ops' END,
       CASE WHEN g % 2 = 0 THEN 'endpoint.pause' ELSE 'endpoint.resume' END,
       'endpoint', (ARRAY['notification', 'trip', 'driver', 'rider'])[1 + g % 4], '192.0.2.1',
       '{"state": "ACTIVE"}', '{"state": "PAUSED"}'
  FROM generate_series(1, $audit) AS g;
"""
)


@dataclass
class Timing:
    page: str
    status: int
    median_ms: float
    slowest_ms: float
    size: int


def server_url(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


async def prepare(base_url: str, deliveries: int) -> str:
    """A fresh, migrated, filled database; its URL."""
    admin = await asyncpg.connect(server_url(base_url, "postgres"))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()
    url = server_url(base_url, DATABASE)
    migrate = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "payment_cli.cli", "migrate",
        env={**os.environ, "DATABASE_URL": url, "GATEWAY": "none"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, errors = await migrate.communicate()
    if migrate.returncode:
        raise SystemExit(f"migrate failed:\n{errors.decode()}")
    payments = deliveries // len(ENDPOINTS)
    conn = await asyncpg.connect(url)
    try:
        started = time.monotonic()
        names = "ARRAY[" + ", ".join(f"'{name}'" for name in ENDPOINTS) + "]"
        await conn.execute(
            FILL_SQL.substitute(payments=payments, endpoints=names, audit=AUDIT_ENTRIES)
        )
        await conn.execute("VACUUM ANALYZE")
        count = await conn.fetchval("SELECT count(*) FROM deliveries")
        print(f"filled {count:,} deliveries in {time.monotonic() - started:.0f} s", flush=True)
    finally:
        await conn.close()
    return url


async def measure(base: str, requests: int) -> list[Timing]:
    console = base + "/admin/console"
    async with httpx.AsyncClient(timeout=30, follow_redirects=False) as client:
        signed = await client.post(console + "/sign-in", data={"token": TOKEN})
        assert signed.status_code == 303, signed.text
        dead_payment = 107  # payment_id % 100 == 7: its deliveries are dead
        older = 50_000
        pages = {
            "overview": "/",
            "endpoints": "/endpoints",
            "endpoint (failing)": "/endpoints/trip",
            "payment search (reference)": "/payments?q=PAY-20250101-0000006b",
            "payment search (trip or id)": "/payments?q=107",
            "payment story": f"/payments/{dead_payment}",
            "payment search (intent)": "/payments?q=pi_107",
            "payment search (gateway refund)": "/payments?q=re_111",
            "payment story (gateway refund)": "/payments/111",
            "gateway review": "/gateway/review",
            "gateway review, later page": "/gateway/review?after=100000",
            "audit": "/audit",
            "audit, one actor": "/audit?actor=cli:alice",
            "audit, one target, older page": f"/audit?target=endpoint:trip&before={older}",
        }
        timings = []
        for name, path in pages.items():
            durations = []
            status = size = 0
            for n in range(requests + 2):
                started = time.perf_counter()
                answer = await client.get(console + path)
                elapsed = time.perf_counter() - started
                status, size = answer.status_code, len(answer.content)
                if n >= 2:  # two to warm up
                    durations.append(elapsed * 1000)
            timings.append(Timing(name, status, statistics.median(durations), max(durations), size))
    return timings


async def wait_ready(base: str, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    async with httpx.AsyncClient(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise SystemExit("serve exited before answering")
            try:
                if (await client.get(base + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"serve did not answer within {START_TIMEOUT_SECONDS} s")


async def run(args: argparse.Namespace) -> int:
    url = await prepare(args.database_url, args.deliveries)
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "ADMIN_API_KEYS": f"ops:{TOKEN}",
        "GATEWAY": "none",
        "LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "payment_cli.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, process)
        timings = await measure(base, args.requests)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
        if not args.keep:
            admin = await asyncpg.connect(server_url(args.database_url, "postgres"))
            try:
                await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            finally:
                await admin.close()
    print(f"\n{args.deliveries:,} deliveries, {args.requests} requests per page")
    print(f"{'page':<34} {'status':>6} {'median':>9} {'slowest':>9} {'bytes':>8}")
    for t in timings:
        print(
            f"{t.page:<34} {t.status:>6} {t.median_ms:>7.1f}ms {t.slowest_ms:>7.1f}ms {t.size:>8}"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="a PostgreSQL server to make the database on (default DATABASE_URL's server)",
    )
    parser.add_argument("--deliveries", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=20, help="timed requests per page")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = parser.parse_args()
    if not args.database_url:
        parser.error("give --database-url (or set DATABASE_URL)")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
