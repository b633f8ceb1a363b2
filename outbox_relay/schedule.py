"""What an attempt's answer means and when to try again: pure functions, no I/O.

An *attempt* is one claim of an event by a relay; inside it the relay may make a few quick tries
(tenacity). `RELAY_MAX_ATTEMPTS` counts attempts; the durable schedule spaces them out.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

JITTER = 0.10  # ±10 % on every scheduled delay, so a failed burst does not come back as a burst
MAX_RETRY_AFTER_SECONDS = 86_400  # a receiver's Retry-After is honoured up to one day


class Verdict(enum.Enum):
    DELIVERED = "delivered"  # 2xx
    RETRYABLE = "retryable"  # connection error, timeout, 408, 429, 5xx: worth a quick retry
    FAILED = "failed"  # any other answer (3xx, 4xx): a failed attempt, no quick retry
    GONE = "gone"  # 410: the receiver takes nothing more: its endpoint is DISABLED


class Outcome(enum.Enum):
    """How an attempt ends for the event's row."""

    DELIVERED = "DELIVERED"
    RESCHEDULED = "PENDING"  # failed; tried again after a delay
    DEAD = "DEAD"


def classify(status_code: int) -> Verdict:
    if 200 <= status_code < 300:
        return Verdict.DELIVERED
    if status_code == 410:
        return Verdict.GONE
    if status_code in (408, 429) or status_code >= 500:
        return Verdict.RETRYABLE
    return Verdict.FAILED


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or HTTP date); None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²" is a digit to str.isdigit, not to int()
        return float(min(int(value), MAX_RETRY_AFTER_SECONDS))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def retry_delay(
    attempts: int,
    schedule: Sequence[float],
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt number `attempts` (from 1); the last step repeats."""
    base = schedule[min(max(attempts, 1), len(schedule)) - 1]
    delay = base * (1 + (rng or random).uniform(-JITTER, JITTER))
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return delay


def decide(
    verdict: Verdict,
    *,
    attempts: int,
    max_attempts: int,
    schedule: Sequence[float],
    retry_after: float | None = None,
    counted: bool = True,
) -> tuple[Outcome, float]:
    """The row's fate after attempt number `attempts` (counting this one) ended with `verdict`.

    Returns the outcome and, for a reschedule, the delay in seconds (0 otherwise). Only a counted
    failure (`counts`) can make a delivery DEAD: 410 Gone disables its endpoint instead (endpoint
    health), and the delivery waits, PENDING, for `endpoints enable`.
    """
    if verdict is Verdict.DELIVERED:
        return Outcome.DELIVERED, 0.0
    if counts(verdict, counted=counted) and attempts >= max_attempts:
        return Outcome.DEAD, 0.0
    return Outcome.RESCHEDULED, retry_delay(attempts, schedule, retry_after=retry_after)


def counts(verdict: Verdict, *, counted: bool) -> bool:
    """Whether an attempt counts toward RELAY_MAX_ATTEMPTS: made while its endpoint's breaker was
    closed (`counted`), and not answered 410 Gone (that disables the endpoint)."""
    return counted and verdict is not Verdict.GONE
