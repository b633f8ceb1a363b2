"""Fixtures of the fault tests: each test owns a PostgreSQL, a receiver and the service's processes.

- `fault_db`: an embedded PostgreSQL of the test's own (data outside pytest's basetemp),
  migrated; the test may stop and start it. It is not the session's shared server.
- `receiver` (tests/support/receiver.py): the test receiver the relay posts to; `stack` gives it
  the signing secret, so every callback's signature is verified.
- `trip`: a second receiver, subscribed by `stack` as endpoint `trip` with a secret of its own;
- `own_gateway`: a real localstripe process of the test's own (everything it holds is the test's);
- `money_stack` (tests/faults/gateway_harness.py): the stack on this test's database on the
  session's PostgreSQL, with `own_gateway` and a fault proxy in front of it;
- `stack`: starts `payment-service serve` / `relay` processes against the database and both
  receivers; at the end every process is stopped and the tail of each log is printed (pytest shows
  it when the test failed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from payment_service.gateway.embedded import EmbeddedGateway
from tests.faults.gateway_harness import MoneyStack
from tests.faults.harness import ServiceStack
from tests.support.database import FaultDatabase, OneShotReads, scratch_dir
from tests.support.fault_proxy import FaultProxy
from tests.support.receiver import Receiver


@pytest.fixture
async def fault_db() -> AsyncIterator[FaultDatabase]:
    # Not under pytest's basetemp (see scratch_dir).
    with scratch_dir("payments-faults-pg-") as base:
        db = FaultDatabase(base / "pgdata")
        try:
            await db.create()
            yield db
        finally:
            await db.stop(immediate=True)


@pytest.fixture
async def trip() -> AsyncIterator[Receiver]:
    receiver = await Receiver(path="/trip").start()
    try:
        yield receiver
    finally:
        await receiver.close()


@contextlib.asynccontextmanager
async def service_stack(
    db: OneShotReads, receiver: Receiver, trip: Receiver, workdir: Path
) -> AsyncIterator[ServiceStack]:
    """The stack on `db` (a FaultDatabase, or the failover test's cluster), `trip` subscribed;
    every process stopped and its log's tail printed at the end."""
    services = ServiceStack(db, receiver, workdir)  # type: ignore[arg-type]
    await services.subscribe("trip", trip)
    try:
        yield services
    finally:
        await services.close()
        services.print_logs()


@pytest.fixture
async def stack(
    fault_db: FaultDatabase, receiver: Receiver, trip: Receiver, tmp_path: Path
) -> AsyncIterator[ServiceStack]:
    async with service_stack(fault_db, receiver, trip, tmp_path) as services:
        yield services


class ClonedDatabase(OneShotReads):
    """This test's database on the session's PostgreSQL (none of these tests stops it)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=10)


@pytest.fixture
async def own_gateway(tmp_path: Path) -> AsyncIterator[EmbeddedGateway]:
    gateway = EmbeddedGateway(log_path=tmp_path / "localstripe.log")
    await asyncio.to_thread(gateway.start)
    try:
        yield gateway
    finally:
        await asyncio.to_thread(gateway.stop)


@pytest.fixture
async def money_stack(
    database_url: str,
    receiver: Receiver,
    trip: Receiver,
    own_gateway: EmbeddedGateway,
    tmp_path: Path,
) -> AsyncIterator[MoneyStack]:
    """The test's processes (none started yet), its gateway and the proxy in front of it."""
    db = ClonedDatabase(database_url)
    async with service_stack(db, receiver, trip, tmp_path) as services:
        proxy = await FaultProxy(own_gateway.base_url).start()
        stack = MoneyStack(services, own_gateway, proxy)
        try:
            yield stack
        finally:
            await stack.close()
            await proxy.close()
