"""Endpoint health's SQL: the state machine of `outbox_relay.health` run on the `endpoints` row.

Every relay records into the same row, so a change is made in a short transaction that locks the
row (`SELECT … FOR NO KEY UPDATE`), folds the attempts' verdicts in with the pure `apply`, and
writes the result: two relays recording at once are serialised by the row lock, and neither loses
the other's failures. NO KEY: the lock an UPDATE of these columns takes anyway, which leaves the
KEY SHARE lock of the API's fan-out (the foreign key of each delivery it writes) free, so a
relay recording an endpoint's health never holds up the payments of every endpoint (FOR UPDATE
did: each of the API's inserts waited for the health write of a flapping endpoint). The common
case, successes on a healthy endpoint, is one statement without a transaction. Every state
change is NOTIFYed on ENDPOINTS_CHANNEL (the relays reload their endpoints), logged as a warning
and counted in `relay_endpoint_state_changes_total`.

A half-open breaker lets one probe through across all relays: `lease_probe` takes the lease
(`endpoints.probe_until`) under the same row lock; whoever gets True sends one delivery.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from prometheus_client import Counter

from outbox_relay.health import Change, Health, HealthPolicy, Step, apply, start_probe
from outbox_relay.schedule import Verdict
from payment_service import ENDPOINTS_CHANNEL
from payment_service.endpoints import HASTEN_SQL

logger = logging.getLogger(__name__)

LOCK_SQL = """
SELECT name, state, state_reason, consecutive_failures, breaker_open_until,
       breaker_cooldown_seconds, probe_until, failing_since, last_success_at, now() AS now
  FROM endpoints
 WHERE endpoint_id = $1
   FOR NO KEY UPDATE
"""

WRITE_SQL = """
UPDATE endpoints
   SET state = $2,
       state_reason = $3,
       state_changed_at = CASE WHEN state = $2 THEN state_changed_at ELSE now() END,
       consecutive_failures = $4,
       breaker_open_until = $5,
       breaker_cooldown_seconds = $6,
       probe_until = $7,
       failing_since = $8,
       last_success_at = $9
 WHERE endpoint_id = $1
"""

# Successes on an endpoint with nothing to recover from: all that changes is last_success_at
# (what `apply` would compute, in one statement). No row: the general path decides.
HEALTHY_SUCCESS_SQL = """
UPDATE endpoints
   SET last_success_at = now()
 WHERE endpoint_id = $1
   AND consecutive_failures = 0
   AND breaker_open_until IS NULL
   AND probe_until IS NULL
   AND failing_since IS NULL
"""

# A probe lease taken but not used (nothing was due): over now, so another probe may go at once.
END_PROBE_SQL = """
UPDATE endpoints
   SET probe_until = now()
 WHERE endpoint_id = $1
   AND probe_until > now()
"""

NOTIFY_SQL = "SELECT pg_notify($1, $2)"


@dataclass(frozen=True)
class HealthUpdate:
    """What recording some attempts did to their endpoint."""

    counted: list[bool]  # per verdict, in order: counts toward RELAY_MAX_ATTEMPTS
    changes: tuple[Change, ...]
    hastened: int = 0  # deliveries made due at once because the breaker closed


def recorded_verdict(status: str, status_code: int | None) -> Verdict:
    """An attempt's verdict for the breaker from what its delivery row got: DELIVERED, 410 Gone,
    or any other failure (connection error, timeout, 408, 429, 5xx, other 4xx alike)."""
    if status == "DELIVERED":
        return Verdict.DELIVERED
    return Verdict.GONE if status_code == 410 else Verdict.FAILED


def _health(row: asyncpg.Record) -> Health:
    return Health(
        state=row["state"],
        consecutive_failures=row["consecutive_failures"],
        breaker_open_until=row["breaker_open_until"],
        breaker_cooldown_seconds=row["breaker_cooldown_seconds"],
        probe_until=row["probe_until"],
        failing_since=row["failing_since"],
        last_success_at=row["last_success_at"],
        state_reason=row["state_reason"],
    )


async def _write(conn: asyncpg.Connection, endpoint_id: int, health: Health) -> None:
    await conn.execute(
        WRITE_SQL,
        endpoint_id,
        health.state,
        health.state_reason,
        health.consecutive_failures,
        health.breaker_open_until,
        health.breaker_cooldown_seconds,
        health.probe_until,
        health.failing_since,
        health.last_success_at,
    )


def _announce(name: str, changes: Sequence[Change], state_changes: Counter | None) -> None:
    for change in changes:
        logger.warning(
            "endpoint %s changed",
            change.kind,
            extra={
                "endpoint": name,
                "from": change.from_,
                "to": change.to,
                "reason": change.reason,
            },
        )
        if state_changes is not None:
            state_changes.labels(name, change.to.lower()).inc()


async def record_health(
    conn: asyncpg.Connection,
    endpoint_id: int,
    verdicts: Sequence[Verdict],
    *,
    policy: HealthPolicy,
    state_changes: Counter | None = None,
) -> HealthUpdate | None:
    """Apply finished attempts' verdicts (one per attempt, quick retries counted once, in the
    order they finished) to the endpoint's health; None when the endpoint no longer exists.

    Call it once per endpoint for each batch of attempts the relay records (`recorded_verdict`
    turns a written attempt into its verdict). `counted` says which attempts count toward
    RELAY_MAX_ATTEMPTS: those made while the breaker was closed.
    """
    if not verdicts:
        return HealthUpdate([], ())
    if (
        all(v is Verdict.DELIVERED for v in verdicts)
        and await conn.execute(HEALTHY_SUCCESS_SQL, endpoint_id) == "UPDATE 1"
    ):
        return HealthUpdate([True] * len(verdicts), ())
    async with conn.transaction():
        row = await conn.fetchrow(LOCK_SQL, endpoint_id)
        if row is None:
            return None
        before = health = _health(row)
        counted: list[bool] = []
        changes: list[Change] = []
        for verdict in verdicts:
            step: Step = apply(health, verdict, now=row["now"], policy=policy)
            health = step.health
            counted.append(step.counted)
            changes.extend(step.changes)
        if health != before:
            await _write(conn, endpoint_id, health)
        hastened = 0
        if changes:
            await conn.execute(NOTIFY_SQL, ENDPOINTS_CHANNEL, row["name"])
            if health.breaker_open_until is None and before.breaker_open_until is not None:
                hastened = int((await conn.execute(HASTEN_SQL, endpoint_id)).split()[-1])
    _announce(row["name"], changes, state_changes)
    return HealthUpdate(counted, tuple(changes), hastened)


async def lease_probe(
    conn: asyncpg.Connection,
    endpoint_id: int,
    *,
    lease_seconds: float,
    state_changes: Counter | None = None,
) -> bool:
    """Take the one probe a half-open breaker allows, for `lease_seconds` (the delivery's lease).

    True: this relay may claim one delivery of the endpoint and send it; its recorded verdict ends
    the probe (`record_health`). If it finds nothing to send, it calls `end_probe`. False: the
    endpoint is not ACTIVE, its breaker is closed or still open, or another probe is in flight.
    """
    async with conn.transaction():
        row = await conn.fetchrow(LOCK_SQL, endpoint_id)
        if row is None:
            return False
        started = start_probe(_health(row), now=row["now"], lease_seconds=lease_seconds)
        if started is None:
            return False
        leased, changes = started
        await _write(conn, endpoint_id, leased)
        if changes:
            await conn.execute(NOTIFY_SQL, ENDPOINTS_CHANNEL, row["name"])
    _announce(row["name"], changes, state_changes)
    return True


async def end_probe(conn: asyncpg.Connection, endpoint_id: int) -> None:
    """Give back a probe lease that sent nothing, so the next probe need not wait for it to end."""
    await conn.execute(END_PROBE_SQL, endpoint_id)
