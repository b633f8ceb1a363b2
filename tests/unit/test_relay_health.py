"""Endpoint health as a pure state machine (outbox_relay.health): the breaker, its probe, counted
attempts, DISABLED after hours of failure or at once on 410 Gone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from outbox_relay.endpoint_health import recorded_verdict
from outbox_relay.health import Breaker, Change, Health, HealthPolicy, Step, apply, start_probe
from outbox_relay.schedule import Verdict
from payment_service.config import Settings

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
POLICY = HealthPolicy(breaker_failures=3, cooldown_seconds=30, disable_after_hours=120)
ACTIVE = Health(state="ACTIVE")


def fail(health: Health, times: int, *, now: datetime = NOW) -> list[Step]:
    steps = []
    for _ in range(times):
        step = apply(health, Verdict.RETRYABLE, now=now, policy=POLICY)
        steps.append(step)
        health = step.health
    return steps


def opened(cooldown: float = 30, *, failures: int = 3) -> Health:
    """An endpoint whose breaker opened at NOW with `cooldown`."""
    return Health(
        state="ACTIVE",
        consecutive_failures=failures,
        breaker_open_until=NOW + timedelta(seconds=cooldown),
        breaker_cooldown_seconds=cooldown,
        failing_since=NOW - timedelta(minutes=5),
    )


def test_policy_from_the_settings() -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        endpoint_breaker_failures=4,
        endpoint_breaker_cooldown_seconds=12,
        endpoint_disable_after_hours=2,
    )
    assert HealthPolicy.from_settings(settings) == HealthPolicy(4, 12, 2, 600)


def test_the_breaker_opens_after_n_consecutive_failed_attempts() -> None:
    steps = fail(ACTIVE, 3)
    assert [s.changes for s in steps[:2]] == [(), ()]
    assert [s.health.breaker(NOW) for s in steps] == [Breaker.CLOSED] * 2 + [Breaker.OPEN]
    (change,) = steps[2].changes
    assert (change.kind, change.from_, change.to) == ("breaker", "closed", "open")
    assert "3 consecutive" in change.reason
    last = steps[2].health
    assert last.breaker_open_until == NOW + timedelta(seconds=30)
    assert last.breaker_cooldown_seconds == 30
    assert last.consecutive_failures == 3
    assert last.failing_since == NOW
    # Made while the breaker was closed, the attempt that opens it still counts.
    assert all(s.counted for s in steps)


@pytest.mark.parametrize("verdict", [Verdict.RETRYABLE, Verdict.FAILED])
def test_every_kind_of_failure_counts_toward_the_breaker(verdict: Verdict) -> None:
    health = ACTIVE
    for _ in range(3):
        health = apply(health, verdict, now=NOW, policy=POLICY).health
    assert health.breaker(NOW) is Breaker.OPEN


def test_a_success_between_failures_starts_the_count_afresh() -> None:
    health = fail(ACTIVE, 2)[-1].health
    success = apply(health, Verdict.DELIVERED, now=NOW, policy=POLICY)
    assert success.changes == () and success.counted
    assert success.health.consecutive_failures == 0
    assert success.health.failing_since is None
    assert success.health.last_success_at == NOW
    assert fail(success.health, 2)[-1].health.breaker(NOW) is Breaker.CLOSED


def test_attempts_while_open_are_not_counted_and_change_nothing_more() -> None:
    health = opened()
    later = NOW + timedelta(seconds=5)
    step = apply(health, Verdict.RETRYABLE, now=later, policy=POLICY)
    assert not step.counted and step.changes == ()
    assert step.health.breaker_open_until == health.breaker_open_until
    assert step.health.consecutive_failures == 4


def test_the_breaker_is_half_open_after_its_cooldown() -> None:
    health = opened()
    assert health.breaker(NOW + timedelta(seconds=29)) is Breaker.OPEN
    assert health.breaker(NOW + timedelta(seconds=30)) is Breaker.HALF_OPEN


def test_one_probe_at_a_time_after_the_cooldown() -> None:
    health = opened()
    assert start_probe(health, now=NOW + timedelta(seconds=10), lease_seconds=30) is None

    after = NOW + timedelta(seconds=31)
    started = start_probe(health, now=after, lease_seconds=30)
    assert started is not None
    leased, changes = started
    assert leased.probe_until == after + timedelta(seconds=30)
    assert [(c.from_, c.to) for c in changes] == [("open", "half_open")]
    # While the lease runs, no second probe.
    assert start_probe(leased, now=after + timedelta(seconds=29), lease_seconds=30) is None
    # The relay sending it died: once its lease is over another probe may go, and that is no
    # new change of state.
    again = start_probe(leased, now=after + timedelta(seconds=31), lease_seconds=30)
    assert again is not None and again[1] == ()


@pytest.mark.parametrize("state", ["PAUSED", "DISABLED"])
def test_no_probe_for_an_endpoint_that_is_not_active(state: str) -> None:
    health = Health(**{**opened().__dict__, "state": state})
    assert start_probe(health, now=NOW + timedelta(minutes=5), lease_seconds=30) is None


def test_no_probe_while_closed() -> None:
    assert start_probe(ACTIVE, now=NOW, lease_seconds=30) is None


def probing(cooldown: float) -> tuple[Health, datetime]:
    """An endpoint whose probe is in flight, cooldown `cooldown` over."""
    at = NOW + timedelta(seconds=cooldown + 1)
    started = start_probe(opened(cooldown), now=at, lease_seconds=30)
    assert started is not None
    return started[0], at


def test_a_failed_probe_reopens_with_the_cooldown_doubled() -> None:
    health, at = probing(30)
    step = apply(health, Verdict.RETRYABLE, now=at, policy=POLICY)
    assert not step.counted
    (change,) = step.changes
    assert (change.from_, change.to) == ("half_open", "open")
    assert step.health.breaker_cooldown_seconds == 60
    assert step.health.breaker_open_until == at + timedelta(seconds=60)
    assert step.health.probe_until is None


def test_the_cooldown_doubles_up_to_ten_minutes() -> None:
    cooldowns = []
    health, at = probing(30)
    for _ in range(7):
        health = apply(health, Verdict.FAILED, now=at, policy=POLICY).health
        cooldowns.append(health.breaker_cooldown_seconds)
        assert health.breaker_open_until is not None
        at = health.breaker_open_until + timedelta(seconds=1)
        started = start_probe(health, now=at, lease_seconds=30)
        assert started is not None
        health = started[0]
    assert cooldowns == [60, 120, 240, 480, 600, 600, 600]


def test_a_successful_probe_closes_the_breaker_and_starts_afresh() -> None:
    health, at = probing(240)
    step = apply(health, Verdict.DELIVERED, now=at, policy=POLICY)
    (change,) = step.changes
    assert (change.kind, change.from_, change.to) == ("breaker", "half_open", "closed")
    assert not step.counted  # made while half-open
    closed = step.health
    assert closed.breaker(at) is Breaker.CLOSED
    assert (closed.consecutive_failures, closed.breaker_cooldown_seconds) == (0, 0)
    assert (closed.probe_until, closed.failing_since, closed.last_success_at) == (None, None, at)
    # The next opening starts again from the base cooldown.
    reopened = fail(closed, 3, now=at)[-1].health
    assert reopened.breaker_cooldown_seconds == 30


def test_a_late_success_while_open_closes_the_breaker() -> None:
    step = apply(opened(), Verdict.DELIVERED, now=NOW, policy=POLICY)
    assert [(c.from_, c.to) for c in step.changes] == [("open", "closed")]
    assert step.health.breaker(NOW) is Breaker.CLOSED


def test_410_disables_at_once_and_the_attempt_does_not_count() -> None:
    step = apply(ACTIVE, Verdict.GONE, now=NOW, policy=POLICY)
    assert not step.counted
    assert step.health.state == "DISABLED"
    assert step.health.state_reason == "the endpoint answered 410 Gone"
    reason = "the endpoint answered 410 Gone"
    assert step.changes == (Change("state", "ACTIVE", "DISABLED", reason),)
    # The breaker is left alone: enabling the endpoint resets it.
    assert step.health.breaker(NOW) is Breaker.CLOSED


def test_410_from_a_probe_ends_its_lease() -> None:
    health, at = probing(30)
    step = apply(health, Verdict.GONE, now=at, policy=POLICY)
    assert step.health.state == "DISABLED" and step.health.probe_until is None


def test_410_from_a_paused_endpoint_disables_it() -> None:
    step = apply(Health(state="PAUSED"), Verdict.GONE, now=NOW, policy=POLICY)
    assert [(c.from_, c.to) for c in step.changes] == [("PAUSED", "DISABLED")]


def test_410_when_disabled_already_changes_nothing() -> None:
    disabled = Health(state="DISABLED", state_reason="by hand")
    step = apply(disabled, Verdict.GONE, now=NOW, policy=POLICY)
    assert step.changes == () and step.health == disabled and not step.counted


def test_failing_without_a_success_for_the_disable_hours_disables() -> None:
    since = NOW - timedelta(hours=120)
    health = Health(**{**opened().__dict__, "failing_since": since})
    almost = apply(health, Verdict.RETRYABLE, now=NOW - timedelta(seconds=1), policy=POLICY)
    assert almost.health.state == "ACTIVE"
    step = apply(health, Verdict.RETRYABLE, now=NOW, policy=POLICY)
    assert step.health.state == "DISABLED"
    (change,) = step.changes
    assert (change.kind, change.from_, change.to) == ("state", "ACTIVE", "DISABLED")
    assert "120 h" in change.reason and since.isoformat() in change.reason
    assert step.health.state_reason == change.reason


def test_a_paused_endpoint_is_not_disabled_by_its_failures() -> None:
    since = NOW - timedelta(hours=200)
    health = Health(state="PAUSED", consecutive_failures=50, failing_since=since)
    step = apply(health, Verdict.RETRYABLE, now=NOW, policy=POLICY)
    assert step.health.state == "PAUSED"
    assert [c.kind for c in step.changes] == ["breaker"]  # it opens, as for any endpoint


def test_a_success_keeps_a_disabled_endpoint_disabled() -> None:
    disabled = Health(state="DISABLED", consecutive_failures=4, failing_since=NOW)
    step = apply(disabled, Verdict.DELIVERED, now=NOW, policy=POLICY)
    assert step.health.state == "DISABLED"
    assert step.health.consecutive_failures == 0


def test_naive_times_are_refused() -> None:
    naive = datetime(2025, 3, 1, 12, 0)
    with pytest.raises(ValueError, match="timezone-aware"):
        apply(ACTIVE, Verdict.DELIVERED, now=naive, policy=POLICY)
    with pytest.raises(ValueError, match="timezone-aware"):
        start_probe(ACTIVE, now=naive, lease_seconds=1)


@pytest.mark.parametrize(
    ("status", "status_code", "verdict"),
    [
        ("DELIVERED", 200, Verdict.DELIVERED),
        ("PENDING", 410, Verdict.GONE),
        ("PENDING", 500, Verdict.FAILED),
        ("PENDING", None, Verdict.FAILED),  # refused, timed out
        ("DEAD", 400, Verdict.FAILED),
    ],
)
def test_the_verdict_of_a_recorded_attempt(
    status: str, status_code: int | None, verdict: Verdict
) -> None:
    assert recorded_verdict(status, status_code) is verdict
