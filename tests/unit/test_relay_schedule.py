"""The retry schedule, Retry-After parsing and the verdict on an answer (pure functions)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from outbox_relay.schedule import (
    JITTER,
    MAX_RETRY_AFTER_SECONDS,
    Outcome,
    Verdict,
    classify,
    counts,
    decide,
    parse_retry_after,
    retry_delay,
)
from payment_service.config import Settings

# The schedule the README and .env.example describe (seconds).
README_SCHEDULE = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400)


def test_default_schedule_is_the_documented_one() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.relay_retry_schedule == README_SCHEDULE
    assert settings.relay_max_attempts == len(README_SCHEDULE) + 1


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (201, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (299, Verdict.DELIVERED),
        (410, Verdict.GONE),
        (408, Verdict.RETRYABLE),
        (429, Verdict.RETRYABLE),
        (500, Verdict.RETRYABLE),
        (502, Verdict.RETRYABLE),
        (503, Verdict.RETRYABLE),
        (599, Verdict.RETRYABLE),
        (400, Verdict.FAILED),
        (401, Verdict.FAILED),
        (404, Verdict.FAILED),
        (409, Verdict.FAILED),
        (422, Verdict.FAILED),
        (301, Verdict.FAILED),
        (304, Verdict.FAILED),
        (101, Verdict.FAILED),
    ],
)
def test_classify(status: int, verdict: Verdict) -> None:
    assert classify(status) is verdict


@pytest.mark.parametrize("attempts", range(1, 12))
def test_delay_follows_the_schedule_within_jitter(attempts: int) -> None:
    base = README_SCHEDULE[attempts - 1]
    delays = [
        retry_delay(attempts, README_SCHEDULE, rng=random.Random(seed)) for seed in range(200)
    ]
    assert all(base * (1 - JITTER) <= d <= base * (1 + JITTER) for d in delays)
    assert len(set(delays)) > 100  # actually jittered


def test_the_last_step_repeats_and_attempt_zero_is_the_first_step() -> None:
    rng = random.Random(1)
    assert 0.9 * 86400 <= retry_delay(30, README_SCHEDULE, rng=rng) <= 1.1 * 86400
    assert 4.5 <= retry_delay(0, README_SCHEDULE, rng=rng) <= 5.5
    assert 1.8 <= retry_delay(7, (2.0,), rng=rng) <= 2.2


def test_retry_after_is_honoured_when_longer_and_capped() -> None:
    rng = random.Random(2)
    assert retry_delay(1, README_SCHEDULE, retry_after=120, rng=rng) == 120
    assert retry_delay(1, README_SCHEDULE, retry_after=1, rng=rng) <= 5.5  # shorter: schedule wins
    capped = retry_delay(1, README_SCHEDULE, retry_after=10 * MAX_RETRY_AFTER_SECONDS, rng=rng)
    assert capped == MAX_RETRY_AFTER_SECONDS


def test_parse_retry_after() -> None:
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120
    assert parse_retry_after(" 7 ") == 7
    assert parse_retry_after("0") == 0
    assert parse_retry_after("99999999") == MAX_RETRY_AFTER_SECONDS
    http_date = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(http_date, now=now) == pytest.approx(90)
    past = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(past, now=now) == 0
    for unusable in (None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2025", "\u00b2", "1\x00"):
        assert parse_retry_after(unusable, now=now) is None


def test_decide() -> None:
    schedule = (10.0, 20.0)
    kwargs: dict[str, Any] = {"max_attempts": 3, "schedule": schedule}
    assert decide(Verdict.DELIVERED, attempts=1, **kwargs) == (Outcome.DELIVERED, 0.0)
    assert decide(Verdict.DELIVERED, attempts=3, **kwargs) == (Outcome.DELIVERED, 0.0)
    # 410 disables the endpoint instead: the delivery waits, PENDING, whatever the attempt count
    for attempts in (1, 3, 4):
        outcome, delay = decide(Verdict.GONE, attempts=attempts, **kwargs)
        assert outcome is Outcome.RESCHEDULED and delay > 0
    # an attempt that does not count (a probe of a half-open breaker) never makes it DEAD
    outcome, _ = decide(Verdict.RETRYABLE, attempts=3, counted=False, **kwargs)
    assert outcome is Outcome.RESCHEDULED
    outcome, delay = decide(Verdict.RETRYABLE, attempts=1, **kwargs)
    assert outcome is Outcome.RESCHEDULED and 9 <= delay <= 11
    outcome, delay = decide(Verdict.FAILED, attempts=2, **kwargs)
    assert outcome is Outcome.RESCHEDULED and 18 <= delay <= 22
    outcome, delay = decide(Verdict.RETRYABLE, attempts=2, retry_after=300, **kwargs)
    assert (outcome, delay) == (Outcome.RESCHEDULED, 300)
    # the last attempt fails: dead
    assert decide(Verdict.RETRYABLE, attempts=3, **kwargs) == (Outcome.DEAD, 0.0)
    assert decide(Verdict.FAILED, attempts=3, **kwargs) == (Outcome.DEAD, 0.0)
    assert Outcome.RESCHEDULED.value == "PENDING"


def test_schedule_setting_parses_comma_separated_seconds() -> None:
    settings = Settings(_env_file=None, relay_retry_schedule=" 0.5, 2 ,10")  # type: ignore[call-arg,arg-type]
    assert settings.relay_retry_schedule == (0.5, 2.0, 10.0)


def test_only_counted_attempts_other_than_410_count() -> None:
    assert counts(Verdict.RETRYABLE, counted=True)
    assert counts(Verdict.FAILED, counted=True)
    assert not counts(Verdict.GONE, counted=True)
    assert not counts(Verdict.RETRYABLE, counted=False)
