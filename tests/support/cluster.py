"""A primary and a synchronous streaming standby of the test's own, built from the embedded
PostgreSQL's binaries (`initdb`, `pg_basebackup -R`, `pg_ctl promote`), for the failover test.

`FailoverCluster` offers what `FaultDatabase` offers (`dsn`, `connect`, `fetch`, `fetchval`), so the
fault tests' `ServiceStack` and assertions run against it unchanged; `dsn` lists both nodes with
`target_session_attrs=read-write`, so whatever connects through it reaches whichever node is the
primary now. The standby is the primary's only synchronous standby (`synchronous_commit=on`,
`synchronous_standby_names` naming it, set once the standby streams): a commit is acknowledged
only once the standby has it, so promoting the standby after the primary dies loses nothing a
client was told is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import asyncpg

from payment_service.embedded import EmbeddedPostgres, free_port
from payment_service.migrations import migrate
from tests.support.database import OWN_DATABASE_NAME, OneShotReads
from tests.support.waiting import wait_for

STANDBY_NAME = "standby"  # its application_name, named in the primary's synchronous_standby_names
REPLICATION_TIMEOUT_SECONDS = 60

# Both nodes: fsync off (the tests survive process crashes, not power loss), room for the
# service's pools, WAL for a standby. The primary's own settings add the synchronous standby.
_COMMON = ["fsync=off", "max_connections=200", "wal_level=replica", "max_wal_senders=5"]


class FailoverCluster(OneShotReads):
    """`create()` builds and starts both nodes and migrates the database through `dsn`;
    `kill_primary()` SIGKILLs the primary's postmaster; `promote()` makes the standby primary."""

    def __init__(self, base: Path, *, primary_only_dsn: bool = False) -> None:
        self.primary = EmbeddedPostgres(
            base / "primary",
            settings=[
                *_COMMON,
                "wal_keep_size=256MB",
                "synchronous_commit=on",
            ],
        )
        # No synchronous_standby_names: promoted, it is alone, and must not wait for a standby.
        self.standby = EmbeddedPostgres(base / "standby", settings=[*_COMMON, "hot_standby=on"])
        self.primary_only_dsn = primary_only_dsn

    # -- the address the service is given -------------------------------------------------------
    @property
    def dsn(self) -> str:
        """Both nodes, read-write wanted; or the primary's address alone (`primary_only_dsn`)."""
        if self.primary_only_dsn:
            return self.primary.dsn(OWN_DATABASE_NAME)
        return self.multi_host_dsn

    @property
    def multi_host_dsn(self) -> str:
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{OWN_DATABASE_NAME}?target_session_attrs=read-write"
        )

    # -- building -----------------------------------------------------------------------------
    async def create(self) -> None:
        await asyncio.to_thread(self._build)
        await self.wait_replicating()
        conn = await self.connect()
        try:
            await migrate(conn)
        finally:
            await conn.close()

    def _build(self) -> None:
        self.primary.start()
        self.primary.ensure_database(OWN_DATABASE_NAME)
        standby = self.standby
        if os.geteuid() == 0:
            standby._prepare_root()  # the data directory, owned by the server's user
        else:
            standby.data_dir.mkdir(mode=0o700)
        conninfo = (
            f"host=127.0.0.1 port={self.primary.port} user=postgres application_name={STANDBY_NAME}"
        )
        # -R writes primary_conninfo (with the application_name) and standby.signal.
        standby._run(
            "pg_basebackup", "-d", conninfo, "-D", str(standby.data_dir), "-R",
            "-X", "stream", "-c", "fast",
        )  # fmt: skip
        standby.port = free_port()
        standby.start()
        # Only now, or the database and the base backup above would wait for a standby forever;
        # with ALTER SYSTEM, not on the command line, so that the reload takes it.
        self.primary.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
        self.primary.psql("SELECT pg_reload_conf()")

    async def wait_replicating(self) -> None:
        """Until the primary streams to the standby as its synchronous standby."""

        async def streaming_sync() -> bool:
            conn = await asyncpg.connect(self.primary.dsn(), timeout=10)
            try:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_replication "
                        "WHERE application_name = $1 AND state = 'streaming' "
                        "AND sync_state = 'sync'",
                        STANDBY_NAME,
                    )
                )
            finally:
                await conn.close()

        await wait_for(
            streaming_sync,
            timeout=REPLICATION_TIMEOUT_SECONDS,
            what="the standby to stream as the synchronous standby",
            interval=0.1,
        )

    # -- the failover ---------------------------------------------------------------------------
    async def kill_primary(self) -> None:
        """SIGKILL the primary's postmaster (its backends notice and exit)."""
        pid = int((self.primary.data_dir / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)

    async def promote(self) -> None:
        """`pg_ctl promote -w`: the standby leaves recovery and takes writes."""
        await asyncio.to_thread(
            self.standby._run, "pg_ctl", "promote", "-w", "-D", str(self.standby.data_dir)
        )

    async def stop(self) -> None:
        for node in (self.standby, self.primary):
            with contextlib.suppress(RuntimeError):  # a node already dead
                await asyncio.to_thread(node.stop, "immediate")

    # -- reading (always the node that is primary now) ------------------------------------------
    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.multi_host_dsn, timeout=10)
