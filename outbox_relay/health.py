"""Endpoint health: the breaker and automatic DISABLED, as a pure state machine.

`apply(health, verdict, now=…, policy=…)` takes one endpoint's health and the verdict of one
*attempt* (quick retries inside it count once) and returns the new health, the state changes it
caused and whether the attempt counts toward RELAY_MAX_ATTEMPTS. No I/O: `endpoint_health` runs it
on the locked `endpoints` row, so every relay shares one breaker per endpoint.

The breaker is *closed* while `breaker_open_until` is NULL, *open* while it lies ahead, and
*half-open* once it has passed: then one probe may go (`probe_until` is that probe's lease).

- `breaker_failures` consecutive failed attempts open it for the base cooldown.
- A failed probe opens it again with the cooldown doubled, up to MAX_BREAKER_COOLDOWN_SECONDS.
- A success closes it and starts the count and the cooldown afresh.
- Only attempts made while it is closed count toward RELAY_MAX_ATTEMPTS: nothing becomes DEAD
  because its endpoint is down.
- An ACTIVE endpoint failing without a success for `disable_after_hours` becomes DISABLED.
- 410 Gone makes an endpoint DISABLED at once; that attempt does not count, and its delivery stays
  PENDING until `endpoints enable`.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from outbox_relay.schedule import Verdict
from payment_service.config import Settings
from payment_service.endpoints import MAX_BREAKER_COOLDOWN_SECONDS


class Breaker(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class HealthPolicy:
    """The settings ENDPOINT_BREAKER_FAILURES, …_COOLDOWN_SECONDS, ENDPOINT_DISABLE_AFTER_HOURS."""

    breaker_failures: int = 10
    cooldown_seconds: float = 30.0
    disable_after_hours: float = 120.0
    max_cooldown_seconds: float = MAX_BREAKER_COOLDOWN_SECONDS

    @classmethod
    def from_settings(cls, settings: Settings) -> HealthPolicy:
        return cls(
            breaker_failures=settings.endpoint_breaker_failures,
            cooldown_seconds=settings.endpoint_breaker_cooldown_seconds,
            disable_after_hours=settings.endpoint_disable_after_hours,
        )


@dataclass(frozen=True)
class Health:
    """The health columns of one `endpoints` row (times timezone-aware)."""

    state: str  # ACTIVE, PAUSED, DISABLED
    consecutive_failures: int = 0
    breaker_open_until: datetime | None = None
    breaker_cooldown_seconds: float = 0.0
    probe_until: datetime | None = None
    failing_since: datetime | None = None
    last_success_at: datetime | None = None
    state_reason: str | None = None

    def breaker(self, now: datetime) -> Breaker:
        if self.breaker_open_until is None:
            return Breaker.CLOSED
        return Breaker.OPEN if self.breaker_open_until > now else Breaker.HALF_OPEN


@dataclass(frozen=True)
class Change:
    """One state change: of the breaker (`closed`, `open`, `half_open`) or of the endpoint's state
    (`ACTIVE`, `PAUSED`, `DISABLED`), with the reason logged beside it."""

    kind: str  # "breaker" or "state"
    from_: str
    to: str
    reason: str


@dataclass(frozen=True)
class Step:
    """What one attempt did to its endpoint."""

    health: Health
    changes: tuple[Change, ...]
    counted: bool  # the attempt counts toward RELAY_MAX_ATTEMPTS (deliveries.counted_attempts)


def apply(health: Health, verdict: Verdict, *, now: datetime, policy: HealthPolicy) -> Step:
    """The endpoint's health after one attempt that ended with `verdict` at `now`."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    before = health.breaker(now)
    if verdict is Verdict.DELIVERED:
        return _succeeded(health, before, now)
    if verdict is Verdict.GONE:
        return _gone(health, before)
    return _failed(health, before, now, policy)


def start_probe(
    health: Health, *, now: datetime, lease_seconds: float
) -> tuple[Health, tuple[Change, ...]] | None:
    """Take the lease of the one probe a half-open breaker lets through, or None when no probe may
    go now: the endpoint is not ACTIVE, its breaker is closed or still open, or another probe's
    lease runs. The first probe after the breaker opened is the change open → half_open."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if health.state != "ACTIVE" or health.breaker(now) is not Breaker.HALF_OPEN:
        return None
    if health.probe_until is not None and health.probe_until > now:
        return None
    changes: tuple[Change, ...] = ()
    # An expired lease (the relay sending the last probe died) means half-open already.
    if health.probe_until is None:
        changes = (Change("breaker", "open", "half_open", "the cooldown is over; one probe goes"),)
    leased = dataclasses.replace(health, probe_until=now + timedelta(seconds=lease_seconds))
    return leased, changes


def _succeeded(health: Health, before: Breaker, now: datetime) -> Step:
    changes: tuple[Change, ...] = ()
    if before is not Breaker.CLOSED:
        changes = (Change("breaker", before.value, Breaker.CLOSED.value, "an attempt succeeded"),)
    healthy = dataclasses.replace(
        health,
        consecutive_failures=0,
        breaker_open_until=None,
        breaker_cooldown_seconds=0.0,
        probe_until=None,
        failing_since=None,
        last_success_at=now,
    )
    return Step(healthy, changes, counted=before is Breaker.CLOSED)


def _gone(health: Health, before: Breaker) -> Step:
    # The receiver says it will never take this: stop sending it anything until an operator
    # enables the endpoint again. The breaker is left as it is (enabling resets it); a probe that
    # got the 410 is over, so its lease ends.
    probe_until = None if before is Breaker.HALF_OPEN else health.probe_until
    if health.state == "DISABLED":
        return Step(dataclasses.replace(health, probe_until=probe_until), (), counted=False)
    reason = "the endpoint answered 410 Gone"
    disabled = dataclasses.replace(
        health, state="DISABLED", state_reason=reason, probe_until=probe_until
    )
    return Step(disabled, (Change("state", health.state, "DISABLED", reason),), counted=False)


def _failed(health: Health, before: Breaker, now: datetime, policy: HealthPolicy) -> Step:
    failures = health.consecutive_failures + 1
    failing_since = health.failing_since or now
    changes: list[Change] = []
    open_until, cooldown, probe_until = (
        health.breaker_open_until,
        health.breaker_cooldown_seconds,
        health.probe_until,
    )
    if before is Breaker.CLOSED and failures >= policy.breaker_failures:
        cooldown = min(policy.cooldown_seconds, policy.max_cooldown_seconds)
        open_until, probe_until = now + timedelta(seconds=cooldown), None
        changes.append(
            Change("breaker", "closed", "open", f"{failures} consecutive failed attempts")
        )
    elif before is Breaker.HALF_OPEN:
        cooldown = min(
            max(health.breaker_cooldown_seconds, policy.cooldown_seconds) * 2,
            policy.max_cooldown_seconds,
        )
        open_until, probe_until = now + timedelta(seconds=cooldown), None
        changes.append(
            Change("breaker", "half_open", "open", f"the probe failed; cooldown {cooldown:g} s")
        )
    # (Open: an attempt that was in flight when the breaker opened; it changes nothing more.)
    state, reason = health.state, health.state_reason
    limit = timedelta(hours=policy.disable_after_hours)
    if state == "ACTIVE" and now - failing_since >= limit:
        state = "DISABLED"
        reason = (
            f"failing without a success for {policy.disable_after_hours:g} h "
            f"(since {failing_since.isoformat()})"
        )
        changes.append(Change("state", "ACTIVE", "DISABLED", reason))
    failed = dataclasses.replace(
        health,
        state=state,
        state_reason=reason,
        consecutive_failures=failures,
        breaker_open_until=open_until,
        breaker_cooldown_seconds=cooldown,
        probe_until=probe_until,
        failing_since=failing_since,
    )
    return Step(failed, tuple(changes), counted=before is Breaker.CLOSED)
