"""What if `deliveries` were partitioned by endpoint, or left room for HOT updates: does one
endpoint's churn cost another's claim?

An embedded PostgreSQL of its own (fsync off: the question is the claim's work, not the disk),
migrated, with four endpoints: `h1` and `h2` healthy (each claimed delivery recorded delivered),
`f` flapping (one in eight recorded as failed, due again 5 s later with its attempt log grown, as
the relay does once its quick retries are spent: they wait in memory, not in the row) and `r`
refusing (its breaker open: never claimed, its backlog grows). An inserter writes the API's
fan-out at --rate events/s; each lane claims (the relay's CLAIM_SQL, 25 at a time) and records
(RECORD_SQL) in a loop of its own. Every 5 s the claim of `h1` is EXPLAIN (ANALYZE, BUFFERS)ed in a
transaction rolled back: its time and the buffers it touched (the work it did, whatever else the
machine runs), beside the dead tuples autovacuum has yet to remove.

    .venv/bin/python -m loadtests.whatif.deliveries_bloat shared --seconds 150
    .venv/bin/python -m loadtests.whatif.deliveries_bloat shared --quiet    # no flapping endpoint
    .venv/bin/python -m loadtests.whatif.deliveries_bloat partitioned       # LIST by endpoint
    .venv/bin/python -m loadtests.whatif.deliveries_bloat fillfactor        # fillfactor 70

docs/benchmarks.md ("One endpoint's trouble at volume") has what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from outbox_relay import outbox
from payment_service.database import connect
from payment_service.embedded import EmbeddedPostgres
from payment_service.migrations import migrate

SAMPLE_SECONDS = 5.0
CLAIM_LIMIT = 25
FAILED_SHARE = 0.125  # a try fails half the time: all three tries of an attempt, one in eight

# `deliveries` as migration 0006 makes it, LIST-partitioned by endpoint: the primary key must hold
# the partition key, and each statement names the endpoint so that it reads one partition.
PARTITIONED = """
ALTER TABLE deliveries RENAME TO deliveries_unpartitioned;
CREATE SEQUENCE deliveries_partitioned_id_seq;
CREATE TABLE deliveries (
    delivery_id      bigint      NOT NULL DEFAULT nextval('deliveries_partitioned_id_seq'),
    event_id         bigint      NOT NULL REFERENCES outbox_events (id) ON DELETE CASCADE,
    endpoint_id      bigint      NOT NULL REFERENCES endpoints (endpoint_id) ON DELETE CASCADE,
    aggregate_id     bigint      NOT NULL,
    status           text        NOT NULL DEFAULT 'PENDING',
    attempts         int         NOT NULL DEFAULT 0,
    counted_attempts int         NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    locked_until     timestamptz,
    claim_token      uuid,
    last_error       text,
    last_status_code int,
    last_attempt_at  timestamptz,
    attempt_log      jsonb       NOT NULL DEFAULT '[]'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    PRIMARY KEY (endpoint_id, delivery_id),
    UNIQUE (event_id, endpoint_id)
) PARTITION BY LIST (endpoint_id);
CREATE INDEX ON deliveries (endpoint_id, next_attempt_at, event_id) WHERE status = 'PENDING';
CREATE INDEX ON deliveries (endpoint_id, aggregate_id, event_id) WHERE status = 'PENDING';
CREATE INDEX ON deliveries (delivered_at) WHERE status = 'DELIVERED';
CREATE TABLE deliveries_default PARTITION OF deliveries DEFAULT;
DROP TABLE deliveries_unpartitioned;
"""
FAN_OUT = """
WITH event AS (
    INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
    SELECT gen_random_uuid(), 'payment.succeeded', g, '{"amount": 1}'::jsonb
      FROM generate_series($1::bigint, $2::bigint) AS g
 RETURNING id, aggregate_id
)
INSERT INTO deliveries (event_id, endpoint_id, aggregate_id)
SELECT event.id, ep.endpoint_id, event.aggregate_id
  FROM event
  JOIN endpoints AS ep ON ep.state IN ('ACTIVE', 'PAUSED')
 ORDER BY event.id, ep.endpoint_id
"""


def statements(variant: str) -> tuple[str, str]:
    """The relay's claim and record, naming the endpoint where the table is partitioned."""
    claim, record = outbox.CLAIM_SQL, outbox.RECORD_SQL
    if variant == "partitioned":
        claim = claim.replace(
            " WHERE o.delivery_id = due.delivery_id",
            " WHERE o.endpoint_id = $1 AND o.delivery_id = due.delivery_id",
        )
        record = record.replace(
            "     WHERE o.delivery_id = a.id",
            "     WHERE o.endpoint_id = $11 AND o.delivery_id = a.id",
        )
    return claim, record


async def prepare(dsn: str, variant: str, flapping: bool) -> dict[str, int]:
    conn = await connect(dsn)
    try:
        await migrate(conn)
        # The events' payments are not written: their foreign key goes.
        await conn.execute(
            "ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_aggregate_id_fkey"
        )
        await conn.execute("DELETE FROM endpoints")
        ids: dict[str, int] = {}
        for name in ("h1", "h2", "f", "r"):
            ids[name] = await conn.fetchval(
                "INSERT INTO endpoints (name, url) VALUES ($1, 'http://127.0.0.1:9/x')"
                " RETURNING endpoint_id",
                name,
            )
        await conn.execute(
            "UPDATE endpoints SET breaker_open_until = now() + interval '1 day' WHERE name = 'r'"
        )
        if not flapping:
            await conn.execute("UPDATE endpoints SET state = 'PAUSED' WHERE name = 'f'")
        if variant == "fillfactor":
            await conn.execute("ALTER TABLE deliveries SET (fillfactor = 70)")
        if variant == "partitioned":
            await conn.execute(PARTITIONED)
            for name, endpoint_id in ids.items():
                await conn.execute(
                    f"CREATE TABLE deliveries_{name} PARTITION OF deliveries"
                    f" FOR VALUES IN ({int(endpoint_id)})"
                )
                await conn.execute(
                    f"ALTER TABLE deliveries_{name} SET (autovacuum_vacuum_scale_factor = 0.01,"
                    " autovacuum_vacuum_threshold = 1000, autovacuum_analyze_scale_factor = 0.02)"
                )
        return ids
    finally:
        await conn.close()


async def run(dsn: str, args: argparse.Namespace) -> None:
    ids = await prepare(dsn, args.variant, not args.quiet)
    claim_sql, record_sql = statements(args.variant)
    stop = asyncio.Event()
    samples: list[tuple[float, int]] = []

    async def inserter() -> None:
        conn = await connect(dsn)
        period = 0.02
        per_batch = max(1, round(args.rate * period))
        payment = 0
        while not stop.is_set():
            started = time.monotonic()
            await conn.execute(FAN_OUT, payment + 1, payment + per_batch)
            payment += per_batch
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))
        await conn.close()

    async def lane(name: str, failed_share: float) -> None:
        conn = await connect(dsn)
        endpoint_id = ids[name]
        while not stop.is_set():
            token = uuid.uuid4()
            rows = await conn.fetch(claim_sql, endpoint_id, CLAIM_LIMIT, 30.0, token)
            if not rows:
                await asyncio.sleep(0.005)
                continue
            n = len(rows)
            statuses = ["PENDING" if random.random() < failed_share else "DELIVERED" for _ in rows]
            values: list[Any] = [
                [r[0] for r in rows],
                [token] * n,
                statuses,
                [5.0] * n,
                [time.time()] * n,
                [500 if s == "PENDING" else 200 for s in statuses],
                ["HTTP 500" if s == "PENDING" else None for s in statuses],
                [3 if s == "PENDING" else 1 for s in statuses],
                [2] * n,
                [True] * n,
            ]
            if args.variant == "partitioned":
                values.append(endpoint_id)
            await conn.fetch(record_sql, *values)
        await conn.close()

    async def sampler() -> None:
        conn = await connect(dsn)
        started = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(SAMPLE_SECONDS)
            explain = conn.transaction()
            await explain.start()
            plan = await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + claim_sql,
                ids["h1"],
                CLAIM_LIMIT,
                30.0,
                uuid.uuid4(),
            )
            await explain.rollback()
            top = json.loads(plan)[0]
            buffers = top["Plan"].get("Shared Hit Blocks", 0) + top["Plan"].get(
                "Shared Read Blocks", 0
            )
            dead = await conn.fetchval(
                "SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables"
                " WHERE relname LIKE 'deliveries%'"
            )
            samples.append((top["Execution Time"], buffers))
            print(
                f"  t={time.monotonic() - started:5.0f} s: h1's claim {top['Execution Time']:6.2f}"
                f" ms, {buffers:5d} buffers; dead tuples in deliveries {dead}",
                flush=True,
            )
        await conn.close()

    tasks = [asyncio.create_task(inserter()), asyncio.create_task(sampler())]
    tasks += [asyncio.create_task(lane(name, 0.0)) for name in ("h1", "h2")]
    if not args.quiet:
        tasks.append(asyncio.create_task(lane("f", FAILED_SHARE)))
    await asyncio.sleep(args.seconds)
    stop.set()
    await asyncio.gather(*tasks)
    times, buffers = [s[0] for s in samples], [s[1] for s in samples]
    print(
        f"{args.variant}{', no flapping endpoint' if args.quiet else ''}: h1's claim median "
        f"{statistics.median(times):.2f} ms (max {max(times):.2f}), median "
        f"{statistics.median(buffers):.0f} buffers (max {max(buffers)}) over {len(samples)} samples"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=("shared", "partitioned", "fillfactor"))
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--rate", type=int, default=500, help="events per second, fanned out")
    parser.add_argument("--quiet", action="store_true", help="no flapping endpoint")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deliveries-bloat-") as tmp:
        pg = EmbeddedPostgres(
            Path(tmp) / "pg",
            settings=["shared_buffers=256MB", "max_wal_size=4GB", "fsync=off"],
        )
        pg.start()
        try:
            pg.psql('CREATE DATABASE "bloat"')
            asyncio.run(run(pg.dsn("bloat"), args))
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
