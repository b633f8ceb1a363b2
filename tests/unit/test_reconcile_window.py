"""The windows reconciliation compares (pure): what `reconcile` refuses, and where the relay's
scheduled runs start and when they are due."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from payment_service.money.reconcile import (
    MAX_WINDOW,
    OVERLAP,
    StoredReconciliation,
    WindowError,
    check_window,
    next_window,
    seconds_until_due,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def stored(started_at: datetime, until: datetime) -> StoredReconciliation:
    return StoredReconciliation(
        id=1,
        started_at=started_at,
        finished_at=started_at,
        since=until - HOUR,
        until=until,
        differences=0,
        report={},
    )


def test_a_window_in_the_past_is_accepted() -> None:
    check_window(NOW - HOUR, NOW, now=NOW)
    check_window(NOW - MAX_WINDOW, NOW, now=NOW)


@pytest.mark.parametrize(
    ("since", "until", "message"),
    [
        (NOW, NOW + HOUR, "not in the past"),
        (NOW - HOUR, NOW - HOUR, "must be after"),
        (NOW - HOUR, NOW - 2 * HOUR, "must be after"),
        (NOW - MAX_WINDOW - HOUR, NOW, "longer than"),
        (datetime(2026, 5, 1), NOW, "timezone"),
    ],
)
def test_a_window_out_of_range_is_refused(since: datetime, until: datetime, message: str) -> None:
    with pytest.raises(WindowError, match=message):
        check_window(since, until, now=NOW)


def test_the_first_scheduled_run_looks_one_interval_back() -> None:
    assert next_window(None, now=NOW, interval_seconds=3600) == (NOW - HOUR, NOW)
    assert seconds_until_due(None, now=NOW, interval_seconds=3600) == 0


def test_a_scheduled_run_starts_where_the_last_ended_less_the_overlap() -> None:
    last = stored(started_at=NOW - HOUR, until=NOW - HOUR)
    assert next_window(last, now=NOW, interval_seconds=3600) == (NOW - HOUR - OVERLAP, NOW)
    assert seconds_until_due(last, now=NOW, interval_seconds=3600) == 0
    assert (
        seconds_until_due(last, now=NOW - 10 * timedelta(minutes=1), interval_seconds=3600) == 600
    )


def test_a_scheduled_window_after_a_long_pause_is_at_most_the_longest() -> None:
    last = stored(started_at=NOW - 2 * MAX_WINDOW, until=NOW - 2 * MAX_WINDOW)
    since, until = next_window(last, now=NOW, interval_seconds=3600)
    assert (since, until) == (NOW - MAX_WINDOW, NOW)
    check_window(since, until, now=NOW + timedelta(seconds=1))
