"""`Bench`: one embedded PostgreSQL for a run, its databases, and what every section shares."""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .load import run_wrk
from .processes import descendants

TEMPLATE_DB = "bench_template"
# Durable, production-like PostgreSQL settings. Only sizes differ from the defaults: room for the
# benchmark's WAL so that no checkpoint starts inside a measurement (one runs between them).
PG_DURABLE = [
    "fsync=on",
    "synchronous_commit=on",
    "full_page_writes=on",
    "shared_buffers=1GB",
    "max_connections=400",
    "max_wal_size=8GB",
    "checkpoint_timeout=30min",
]
PG_FAST = ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]


class Bench:
    def __init__(
        self, args: argparse.Namespace, workdir: Path, *, fsync: str, results: dict[str, Any]
    ) -> None:
        from payment_service.embedded import EmbeddedPostgres

        self.args = args
        self.workdir = workdir
        self.fsync = fsync
        self.logs = workdir / "logs"
        self.logs.mkdir()
        durable_only = ("fsync=", "synchronous_commit=", "full_page_writes=")
        settings = (
            PG_DURABLE
            if fsync == "on"
            else [v for v in PG_DURABLE if not v.startswith(durable_only)] + PG_FAST
        )
        self.pg_settings = settings
        self.pg = EmbeddedPostgres(workdir / "pgdata", settings=settings)
        self.run_counter = 0
        self.secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.results = results

    # -- database -------------------------------------------------------------------------------
    def start_database(self) -> None:
        self.pg.start()
        self.pg.psql(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}"')
        self.pg.psql(f'CREATE DATABASE "{TEMPLATE_DB}"')
        from payment_service.database import connect
        from payment_service.migrations import migrate

        async def _migrate() -> None:
            conn = await connect(self.pg.dsn(TEMPLATE_DB))
            try:
                await migrate(conn)
            finally:
                await conn.close()

        asyncio.run(_migrate())

    def fresh_db(self, name: str, template: str = TEMPLATE_DB) -> str:
        self.pg.psql(f'DROP DATABASE IF EXISTS "{name}"')
        self.pg.psql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        self.pg.psql("CHECKPOINT")
        return self.pg.dsn(name)

    def drop_db(self, name: str) -> None:
        self.pg.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def postgres_pids(self) -> set[int]:
        pidfile = self.pg.data_dir / "postmaster.pid"
        try:
            return descendants(int(pidfile.read_text().splitlines()[0]))
        except (OSError, ValueError, IndexError):
            return set()

    def scalar(self, database: str, sql: str) -> str:
        return self.pg.psql(sql, database=database).strip()

    # -- helpers --------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "RELAY_"))}
        env.pop("DATABASE_URL", None)
        # No gateway unless a row asks for one (loadtests/bench/gateway.py): payments are recorded.
        env.update({"PYTHONUNBUFFERED": "1", "ENVIRONMENT": "development", "GATEWAY": "none"})
        env.update(extra)
        return env

    def next_trip_base(self) -> int:
        self.run_counter += 1
        return self.run_counter * 1_000_000_000_000

    def wrk(
        self,
        url: str,
        seconds: float,
        prefix: str,
        groups: dict[str, Callable[[], set[int]]] | None = None,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """wrk at the configured connections, with fresh keys and trips."""
        return run_wrk(
            url,
            seconds=seconds,
            connections=self.args.connections,
            threads=self.args.wrk_threads,
            prefix=prefix,
            trip_base=self.next_trip_base(),
            meter_groups=groups,
        )
