"""One attempt at delivering one event: a signed POST, a few quick retries, a verdict.

The first try runs without tenacity (the common case is a 2xx and should cost nothing extra);
only a retryable failure enters tenacity's loop (`retry_quickly`), whose waits honour
`Retry-After` and which stops early rather than outlive the event's lease or a shutdown. The
relay's workers (outbox_relay.workers) run the loop beside them, taking one of the lane's slots
only while a try is on the wire (`send`): a delivery waiting out a quick retry holds no worker.
`deliver` runs the three steps in one go. Each endpoint has its own `Deliverer`: its
`CallbackClient` (keep-alive connections to its URL, see `outbox_relay.http`) and its signing
keys, one `v1,…` signature per key in `webhook-signature` (Standard Webhooks: after a secret's
rotation the new secret and those it replaced in the last 24 hours sign, so a receiver verifies
with any of them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_result,
    wait_exponential,
    wait_random,
)

from outbox_relay.http import CallbackClient, CallbackError, TimedOut
from outbox_relay.outbox import (
    ERROR_TEXT_LIMIT,
    AttemptRecord,
    ClaimedEvent,
    safe_status_code,
    safe_text,
)
from outbox_relay.schedule import Outcome, Verdict, classify, counts, decide, parse_retry_after
from payment_service.signing import sign

logger = logging.getLogger(__name__)

QUICK_WAIT_CAP_FACTOR = 8  # quick retries back off up to 8 times RELAY_QUICK_RETRY_WAIT


@dataclass(slots=True)
class Try:
    """The result of one HTTP request."""

    verdict: Verdict
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None


class Deliverer:
    """Sends events to one endpoint with its keep-alive HTTP client, signed with its keys."""

    def __init__(
        self,
        client: CallbackClient,
        *,
        signing_keys: Sequence[bytes],
        request_timeout: float,
        quick_retries: int,
        quick_retry_wait: float,
        max_attempts: int,
        schedule: tuple[float, ...],
        stopping: Callable[[], bool],
        endpoint: str = "",
    ) -> None:
        self._client = client
        # Replaced when the endpoint's secrets change (rotation); none: callbacks are unsigned.
        self.signing_keys = tuple(signing_keys)
        self.endpoint = endpoint  # its name, for the logs
        self._request_timeout = request_timeout
        self._quick_retries = quick_retries
        cap = quick_retry_wait * QUICK_WAIT_CAP_FACTOR
        self._backoff = wait_exponential(multiplier=quick_retry_wait, max=cap) + wait_random(
            0, quick_retry_wait
        )
        self._quick_wait_limit = cap + quick_retry_wait  # the longest wait a quick retry makes
        self._max_attempts = max_attempts
        self._schedule = schedule
        self._stopping = stopping

    @property
    def retries_quickly(self) -> bool:
        """Whether a retryable failure is tried again at once (RELAY_QUICK_RETRIES > 0)."""
        return self._quick_retries > 0

    async def deliver(self, event: ClaimedEvent, *, lease_deadline: float) -> AttemptRecord:
        """Make one attempt (with its quick retries) and say what the row becomes."""
        attempted_at = time.time()
        started = time.monotonic()
        result = await self.send(event)
        tries = 1
        if result.verdict is Verdict.RETRYABLE and self._quick_retries:
            result, tries = await self.retry_quickly(event, result, lease_deadline=lease_deadline)
        return self.attempt_record(
            event, result, tries=tries, attempted_at=attempted_at, started=started
        )

    def attempt_record(
        self, event: ClaimedEvent, result: Try, *, tries: int, attempted_at: float, started: float
    ) -> AttemptRecord:
        """What the attempt (its last try's `result`, after `tries` tries in all, the first at
        `attempted_at`, epoch, and `started`, monotonic) makes of the row; logged unless
        delivered."""
        counted = counts(result.verdict, counted=event.counted)
        attempts = event.attempts + int(counted)
        outcome, delay = decide(
            result.verdict,
            attempts=attempts,
            max_attempts=self._max_attempts,
            schedule=self._schedule,
            retry_after=result.retry_after,
            counted=counted,
        )
        record = AttemptRecord(
            id=event.id,
            claim_token=event.claim_token,
            status=outcome.value,
            delay=delay,
            attempted_at=attempted_at,
            status_code=result.status_code,
            error=result.error,
            tries=tries,
            duration_ms=round((time.monotonic() - started) * 1000),
            counted=counted,
        )
        if outcome is not Outcome.DELIVERED:
            log = logger.error if outcome is Outcome.DEAD else logger.warning
            log(
                "delivery failed; event is dead"
                if outcome is Outcome.DEAD
                else "delivery failed; rescheduled",
                extra={
                    "endpoint": self.endpoint,
                    "event_id": event.event_id,
                    "payment_id": event.aggregate_id,
                    "attempt": attempts,
                    "tries": tries,
                    "status_code": result.status_code,
                    "error": result.error,
                    "retry_in_seconds": round(delay, 3),
                },
            )
        return record

    async def send(self, event: ClaimedEvent) -> Try:
        """One signed POST of the event's payload; never raises for a network or HTTP failure."""
        timestamp = int(time.time())
        headers = [
            ("content-type", "application/json"),
            ("idempotency-key", event.event_id),
            ("webhook-id", event.event_id),
            ("webhook-timestamp", str(timestamp)),
        ]
        if self.signing_keys:
            signatures = (
                sign(key, event.event_id, timestamp, event.body) for key in self.signing_keys
            )
            headers.append(("webhook-signature", " ".join(signatures)))
        try:
            answer = await self._client.post(event.body, headers)
        except TimedOut as error:
            return Try(Verdict.RETRYABLE, error=safe_text(f"timeout: {error}"))
        except CallbackError as error:  # refused, reset, closed early, not HTTP, malformed
            return Try(Verdict.RETRYABLE, error=safe_text(f"connection error: {error}"))
        status = answer.status
        if safe_status_code(status) is None:
            # "HTTP/1.1 999 Odd" is an answer, but not one that says anything: a receiver in
            # trouble, like a 5xx. The row cannot hold the code; the error keeps the line.
            verdict, status_code, summary = Verdict.RETRYABLE, None, answer.status_line
        else:
            verdict = classify(status)
            if verdict is Verdict.DELIVERED:
                return Try(verdict, status)
            status_code, summary = status, f"HTTP {status}"
        detail = answer.body[:ERROR_TEXT_LIMIT].decode("utf-8", "replace").strip()
        return Try(
            verdict,
            status_code,
            error=safe_text(summary + (f": {detail}" if detail else "")),
            retry_after=parse_retry_after(answer.headers.get("retry-after")),
        )

    async def retry_quickly(
        self,
        event: ClaimedEvent,
        first: Try,
        *,
        lease_deadline: float,
        send: Callable[[], Awaitable[Try | None]] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> tuple[Try, int]:
        """Retry a retryable failure a few times; the last result and the number of tries.

        `send` makes one try (by default `self.send(event)`); it may answer None to say that the
        try cannot go now (the relay is stopping, the lane retired), which ends the retries with
        the last result. `sleep` waits between tries.
        """
        send = send or (lambda: self.send(event))
        last, tries, first_pending, gave_up = first, 1, True, False

        async def attempt() -> Try:
            # tenacity's first attempt is the try already made; the rest go out for real.
            nonlocal last, tries, first_pending, gave_up
            if first_pending:
                first_pending = False
                return first
            result = await send()
            if result is None:
                gave_up = True
                return last
            last, tries = result, tries + 1
            return result

        def wait(state: RetryCallState) -> float:
            assert state.outcome is not None
            retry_after = state.outcome.result().retry_after or 0.0
            return max(self._backoff(state), retry_after)

        def stop(state: RetryCallState) -> bool:
            # Out of tries, shutting down, asked to wait longer than a quick retry would, or the
            # next try could end after the lease (another relay may then take the event).
            return (
                gave_up
                or state.attempt_number > self._quick_retries
                or self._stopping()
                or state.upcoming_sleep > self._quick_wait_limit
                or time.monotonic() + state.upcoming_sleep + self._request_timeout > lease_deadline
            )

        retrying = AsyncRetrying(
            sleep=sleep,
            retry=retry_if_result(lambda result: result.verdict is Verdict.RETRYABLE),
            wait=wait,
            stop=stop,
            retry_error_callback=lambda state: state.outcome.result(),  # type: ignore[union-attr]
        )
        result: Try = await retrying(attempt)
        return result, tries
