"""Endpoint health on a real PostgreSQL (outbox_relay.endpoint_health): the breaker opens after N
failed attempts and closes on success, one probe at a time across relays, 410 and hours of failure
disable, `endpoints enable` resets; every change NOTIFYed, logged and counted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from outbox_relay.endpoint_health import LOCK_SQL, end_probe, lease_probe, record_health
from outbox_relay.health import HealthPolicy
from outbox_relay.metrics import RelayMetrics
from outbox_relay.schedule import Verdict
from payment_service import ENDPOINTS_CHANNEL, endpoints
from tests.support.database import insert_events
from tests.support.waiting import wait_for

POLICY = HealthPolicy(breaker_failures=3, cooldown_seconds=30, disable_after_hours=120)
FAILED, DELIVERED, GONE = Verdict.RETRYABLE, Verdict.DELIVERED, Verdict.GONE


@pytest.fixture
async def endpoint_id(db: asyncpg.Connection) -> int:
    added = await endpoints.insert_endpoint(db, name="trip", url="http://127.0.0.1:9/trips")
    return added.endpoint_id


@pytest.fixture
async def other(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A second connection: another relay."""
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def notified(database_url: str) -> AsyncIterator[list[str]]:
    """Endpoint names NOTIFYed on ENDPOINTS_CHANNEL from now on."""
    names: list[str] = []
    conn = await asyncpg.connect(database_url)
    await conn.add_listener(ENDPOINTS_CHANNEL, lambda *args: names.append(args[3]))
    yield names
    await conn.close()


async def health(db: asyncpg.Connection, endpoint_id: int) -> dict[str, Any]:
    row = await db.fetchrow(
        """SELECT state, state_reason, consecutive_failures, breaker_cooldown_seconds,
                  probe_until, failing_since, last_success_at,
                  CASE WHEN breaker_open_until IS NULL THEN 'closed'
                       WHEN breaker_open_until > now() THEN 'open'
                       ELSE 'half_open' END AS breaker
             FROM endpoints WHERE endpoint_id = $1""",
        endpoint_id,
    )
    assert row is not None
    return dict(row)


async def open_breaker(db: asyncpg.Connection, endpoint_id: int) -> None:
    update = await record_health(db, endpoint_id, [FAILED] * 3, policy=POLICY)
    assert update is not None and [c.to for c in update.changes] == ["open"]


async def end_cooldown(db: asyncpg.Connection, endpoint_id: int) -> None:
    """The breaker's cooldown is over (as if its time had passed): half-open."""
    await db.execute(
        "UPDATE endpoints SET breaker_open_until = now() - interval '1 second'"
        " WHERE endpoint_id = $1",
        endpoint_id,
    )


async def test_n_failed_attempts_open_the_breaker(
    db: asyncpg.Connection,
    endpoint_id: int,
    notified: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = RelayMetrics()
    counter = metrics.endpoint_state_changes
    first = await record_health(db, endpoint_id, [FAILED, FAILED], policy=POLICY)
    assert first is not None and first.changes == () and first.counted == [True, True]
    assert (await health(db, endpoint_id))["breaker"] == "closed"

    with caplog.at_level(logging.WARNING, logger="outbox_relay.endpoint_health"):
        third = await record_health(
            db, endpoint_id, [FAILED, FAILED], policy=POLICY, state_changes=counter
        )
    assert third is not None
    # The third failure opens it and counts; the fourth was made while it was open.
    assert third.counted == [True, False]
    assert [(c.from_, c.to) for c in third.changes] == [("closed", "open")]
    now = await health(db, endpoint_id)
    assert (now["breaker"], now["consecutive_failures"]) == ("open", 4)
    assert now["breaker_cooldown_seconds"] == 30 and now["failing_since"] is not None

    (record,) = [r for r in caplog.records if r.name == "outbox_relay.endpoint_health"]
    assert record.levelno == logging.WARNING
    assert (record.endpoint, record.to) == ("trip", "open")  # type: ignore[attr-defined]
    labels = {"endpoint": "trip", "to": "open"}
    assert metrics.registry.get_sample_value("relay_endpoint_state_changes_total", labels) == 1
    await wait_for(lambda: notified == ["trip"], timeout=10, what="a NOTIFY of the change")


async def test_two_relays_recording_at_once_lose_no_failure(
    db: asyncpg.Connection, other: asyncpg.Connection, endpoint_id: int
) -> None:
    policy = HealthPolicy(breaker_failures=20, cooldown_seconds=30, disable_after_hours=120)

    async def relay(conn: asyncpg.Connection) -> list[str]:
        changes = []
        for _ in range(10):
            update = await record_health(conn, endpoint_id, [FAILED], policy=policy)
            assert update is not None
            changes += [c.to for c in update.changes]
        return changes

    a, b = await asyncio.gather(relay(db), relay(other))
    assert sorted(a + b) == ["open"]  # opened once, by whichever recorded the 20th failure
    now = await health(db, endpoint_id)
    assert (now["consecutive_failures"], now["breaker"]) == (20, "open")


async def test_one_probe_at_a_time_across_relays(
    db: asyncpg.Connection, other: asyncpg.Connection, endpoint_id: int
) -> None:
    metrics = RelayMetrics()
    await open_breaker(db, endpoint_id)
    # Still open: no probe.
    assert not await lease_probe(db, endpoint_id, lease_seconds=30)

    await end_cooldown(db, endpoint_id)
    for round_ in range(5):
        won = await asyncio.gather(
            lease_probe(
                db, endpoint_id, lease_seconds=30, state_changes=metrics.endpoint_state_changes
            ),
            lease_probe(
                other, endpoint_id, lease_seconds=30, state_changes=metrics.endpoint_state_changes
            ),
        )
        assert sorted(won) == [False, True], f"round {round_}"
        assert not await lease_probe(db, endpoint_id, lease_seconds=30)  # the lease runs
        await end_probe(db, endpoint_id)  # nothing was due: the next probe may go at once
    # open → half_open once: later probes of the same half-open breaker are no new change.
    labels = {"endpoint": "trip", "to": "half_open"}
    assert metrics.registry.get_sample_value("relay_endpoint_state_changes_total", labels) == 1


async def test_a_successful_probe_closes_the_breaker_and_sends_the_waiting_deliveries(
    db: asyncpg.Connection, endpoint_id: int
) -> None:
    events = await insert_events(db, payments=3)
    # insert_events fanned them out to the endpoint: each waits out a backoff
    await db.execute(
        "UPDATE deliveries SET next_attempt_at = now() + interval '2 hours' WHERE endpoint_id = $1",
        endpoint_id,
    )
    await open_breaker(db, endpoint_id)
    await end_cooldown(db, endpoint_id)
    assert await lease_probe(db, endpoint_id, lease_seconds=30)

    update = await record_health(db, endpoint_id, [DELIVERED], policy=POLICY)
    assert update is not None
    assert update.counted == [False]  # the probe was made while half-open
    assert [(c.from_, c.to) for c in update.changes] == [("half_open", "closed")]
    assert update.hastened == len(events)
    assert await db.fetchval("SELECT count(*) FROM deliveries WHERE next_attempt_at > now()") == 0
    now = await health(db, endpoint_id)
    assert now["breaker"] == "closed"
    assert (now["consecutive_failures"], now["breaker_cooldown_seconds"]) == (0, 0)
    assert (now["probe_until"], now["failing_since"]) == (None, None)
    assert now["last_success_at"] is not None


async def test_a_failed_probe_reopens_with_the_cooldown_doubled(
    db: asyncpg.Connection, endpoint_id: int
) -> None:
    await open_breaker(db, endpoint_id)
    await end_cooldown(db, endpoint_id)
    assert await lease_probe(db, endpoint_id, lease_seconds=30)
    update = await record_health(db, endpoint_id, [FAILED], policy=POLICY)
    assert update is not None and update.counted == [False]
    assert [(c.from_, c.to) for c in update.changes] == [("half_open", "open")]
    now = await health(db, endpoint_id)
    assert (now["breaker"], now["breaker_cooldown_seconds"], now["probe_until"]) == (
        "open",
        60,
        None,
    )


async def test_successes_on_a_healthy_endpoint_record_the_last_success(
    db: asyncpg.Connection, endpoint_id: int
) -> None:
    update = await record_health(db, endpoint_id, [DELIVERED] * 3, policy=POLICY)
    assert update is not None and update.counted == [True] * 3 and update.changes == ()
    now = await health(db, endpoint_id)
    assert now["last_success_at"] is not None and now["breaker"] == "closed"


async def test_410_disables_at_once(
    db: asyncpg.Connection, endpoint_id: int, notified: list[str]
) -> None:
    metrics = RelayMetrics()
    update = await record_health(
        db, endpoint_id, [GONE], policy=POLICY, state_changes=metrics.endpoint_state_changes
    )
    assert update is not None and update.counted == [False]
    endpoint = await endpoints.select_endpoint(db, "trip")
    assert (endpoint.state, endpoint.state_reason) == ("DISABLED", "the endpoint answered 410 Gone")
    assert endpoint.state_changed_at > endpoint.created_at
    labels = {"endpoint": "trip", "to": "disabled"}
    assert metrics.registry.get_sample_value("relay_endpoint_state_changes_total", labels) == 1
    await wait_for(lambda: notified == ["trip"], timeout=10, what="a NOTIFY of the change")
    # Disabled: no probe either, whatever the breaker says.
    await open_breaker(db, endpoint_id)
    await end_cooldown(db, endpoint_id)
    assert not await lease_probe(db, endpoint_id, lease_seconds=30)


async def test_failing_without_a_success_for_the_disable_hours_disables(
    db: asyncpg.Connection, endpoint_id: int
) -> None:
    await open_breaker(db, endpoint_id)
    await db.execute(
        "UPDATE endpoints SET failing_since = now() - interval '119 hours' WHERE endpoint_id = $1",
        endpoint_id,
    )
    await record_health(db, endpoint_id, [FAILED], policy=POLICY)
    assert (await health(db, endpoint_id))["state"] == "ACTIVE"

    await db.execute(
        "UPDATE endpoints SET failing_since = now() - interval '121 hours' WHERE endpoint_id = $1",
        endpoint_id,
    )
    update = await record_health(db, endpoint_id, [FAILED], policy=POLICY)
    assert update is not None
    assert [(c.kind, c.to) for c in update.changes] == [("state", "DISABLED")]
    now = await health(db, endpoint_id)
    assert now["state"] == "DISABLED" and "120 h" in now["state_reason"]


async def test_enable_closes_the_breaker_and_starts_the_count_afresh(
    db: asyncpg.Connection, endpoint_id: int
) -> None:
    await open_breaker(db, endpoint_id)
    await record_health(db, endpoint_id, [GONE], policy=POLICY)
    enabled = await endpoints.set_state(db, "trip", "ACTIVE")
    assert (enabled.state, enabled.breaker, enabled.consecutive_failures) == ("ACTIVE", "closed", 0)
    now = await health(db, endpoint_id)
    assert (now["breaker_cooldown_seconds"], now["probe_until"], now["failing_since"]) == (
        0,
        None,
        None,
    )
    # Two failures after enabling do not reopen it: the count started afresh.
    update = await record_health(db, endpoint_id, [FAILED, FAILED], policy=POLICY)
    assert update is not None and update.changes == () and update.counted == [True, True]


async def test_an_endpoint_removed_meanwhile_is_no_error(db: asyncpg.Connection) -> None:
    assert await record_health(db, 10**9, [FAILED], policy=POLICY) is None
    assert not await lease_probe(db, 10**9, lease_seconds=30)


async def test_a_relay_holding_an_endpoints_health_lock_never_holds_up_the_apis_fan_out(
    db: asyncpg.Connection, other: asyncpg.Connection, endpoint_id: int
) -> None:
    """While one relay folds an endpoint's verdicts in (its row locked, as `record_health` locks
    it), the API's statement still writes that endpoint's deliveries: their foreign key's lock
    on the row does not wait for it (with a lock timeout, a wait would fail the write)."""
    async with other.transaction():
        await other.fetchrow(LOCK_SQL, endpoint_id)
        async with db.transaction():
            await db.execute("SET LOCAL lock_timeout = '2s'")
            events = await insert_events(db, payments=3)
    assert len(events) == 3
    written = await db.fetchval(
        "SELECT count(*) FROM deliveries WHERE endpoint_id = $1", endpoint_id
    )
    assert written == 3
