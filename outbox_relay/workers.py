"""The workers: each takes a claimed delivery off its lane's queue, sends it and hands the result
to the lane's recorder.

A lane has as many workers as it could ever be allowed (RELAY_CONCURRENCY); its slots bound the
tries on the wire at once (`lane.in_flight_allowed`: its share, `lane.limit`, as its endpoint's
answers earn it), so that an endpoint that hangs until the timeout holds only its own workers,
and one failing many of its tries holds fewer. A retryable failure does not hold its worker while
it waits for a quick retry: the delivery leaves the lane's `held` count for its `waiting` one and
its retries run in a task of their own (`_retry`), taking a slot only while a try is on the wire;
the worker takes the next delivery at once, and the lane goes on claiming. A delivery is
released, not sent, when the relay is stopping, its lane is retired, or it waited in the queue
until too close to the end of its lease (another relay may be about to take it over).
"""

from __future__ import annotations

import asyncio
import logging
import time

from outbox_relay.delivery import Try
from outbox_relay.lanes import Lane
from outbox_relay.outbox import AttemptRecord, ClaimedEvent
from outbox_relay.recorder import Recorder
from outbox_relay.schedule import Verdict, decide
from outbox_relay.state import RelayState, error_text, wait_for

logger = logging.getLogger(__name__)


class Workers:
    """Starts and stops the workers of the relay's lanes, and runs their quick retries."""

    def __init__(self, state: RelayState, recorder: Recorder) -> None:
        self.state = state
        self.recorder = recorder
        settings = state.settings
        # A delivery still queued this close to the end of its lease is released, not sent:
        # another relay may be about to take it over.
        self._lease_margin = min(settings.relay_request_timeout, settings.relay_lease_seconds / 2)
        self._request_timeout = settings.relay_request_timeout

    def start(self, lane: Lane) -> None:
        # As many workers as the lane could ever be allowed; `lane.limit` bounds those sending.
        lane.workers = [
            asyncio.create_task(self._worker(lane))
            for _ in range(self.state.settings.relay_concurrency)
        ]

    def stop(self, lane: Lane) -> None:
        """Release every delivery still queued on the lane and tell its workers to stop (quick
        retries waiting end at their next try, with the result they have)."""
        while not lane.queue.empty():
            item = lane.queue.get_nowait()
            if item is not None:
                self.recorder.release(lane, item[0])
                lane.let_go()
        for _ in lane.workers:
            lane.queue.put_nowait(None)
        lane.slot_freed.set()

    def tasks(self, lane: Lane) -> list[asyncio.Task[None]]:
        """The lane's workers and its quick retries waiting."""
        return [*lane.workers, *lane.retries]

    async def _take_slot(self, lane: Lane) -> bool:
        """Wait until the lane may send one more; False when it must not (stop, retired)."""
        stop = self.state.stop
        while lane.in_flight >= lane.in_flight_allowed:
            if stop.is_set() or lane.retired:
                return False
            lane.slot_freed.clear()
            await lane.slot_freed.wait()
        if stop.is_set() or lane.retired:
            return False
        lane.in_flight += 1
        return True

    def _free_slot(self, lane: Lane) -> None:
        lane.in_flight -= 1
        lane.slot_freed.set()

    async def _worker(self, lane: Lane) -> None:
        recorder = self.recorder
        while True:
            item = await lane.queue.get()
            if item is None:
                return
            event, lease_deadline = item
            if not await self._take_slot(lane):
                recorder.release(lane, event)
                lane.let_go()
                continue
            attempted_at = time.time()
            started = time.monotonic()
            try:
                if started + self._lease_margin > lease_deadline:
                    recorder.release(lane, event)
                    lane.let_go()
                    continue
                result = await self._send(lane, event)
            except asyncio.CancelledError:
                recorder.release(lane, event)
                lane.let_go()
                raise
            finally:
                self._free_slot(lane)
            lane.let_go()
            if (
                isinstance(result, Try)
                and result.verdict is Verdict.RETRYABLE
                and lane.deliverer.retries_quickly
                and lane.waiting < lane.max_waiting
            ):
                lane.waiting += 1
                retry = asyncio.create_task(
                    self._retry(lane, event, result, lease_deadline, attempted_at, started)
                )
                lane.retries.add(retry)
                retry.add_done_callback(lane.retries.discard)
                continue
            record = (
                lane.deliverer.attempt_record(
                    event, result, tries=1, attempted_at=attempted_at, started=started
                )
                if isinstance(result, Try)
                else self._failed(event, result, started)
            )
            recorder.record(lane, record, event)

    async def _retry(
        self,
        lane: Lane,
        event: ClaimedEvent,
        first: Try,
        lease_deadline: float,
        attempted_at: float,
        started: float,
    ) -> None:
        """The quick retries of one delivery, beside the workers: a slot is taken for each try
        only, and a wait between tries ends at once when the relay stops."""
        raised: Exception | None = None

        async def send() -> Try | None:
            nonlocal raised
            if not await self._take_slot(lane):
                return None  # stopping or retired: the retries end with the last result
            try:
                if time.monotonic() + self._request_timeout > lease_deadline:
                    return None
                result = await self._send(lane, event)
            finally:
                self._free_slot(lane)
            if isinstance(result, Exception):
                raised = result
                return None
            return result

        try:
            result, tries = await lane.deliverer.retry_quickly(
                event,
                first,
                lease_deadline=lease_deadline,
                send=send,
                sleep=lambda seconds: wait_for(self.state.stop, seconds),
            )
            record = (
                self._failed(event, raised, started)
                if raised is not None
                else lane.deliverer.attempt_record(
                    event, result, tries=tries, attempted_at=attempted_at, started=started
                )
            )
        except asyncio.CancelledError:
            self.recorder.release(lane, event)
            raise
        except Exception as error:  # a bug, not a receiver's failure: count it as one
            logger.exception(
                "quick retry raised", extra={"event_id": event.event_id, "endpoint": lane.name}
            )
            record = self._failed(event, error, started)
        finally:
            lane.waiting -= 1
        self.recorder.record(lane, record, event)

    async def _send(self, lane: Lane, event: ClaimedEvent) -> Try | Exception:
        """One try on the wire, counted in flight. An exception it raised (a bug, not a
        receiver's failure: `send` never raises for one) is logged and returned."""
        metrics = self.state.metrics
        metrics.in_flight.inc()
        try:
            result = await lane.deliverer.send(event)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.exception(
                "delivery raised", extra={"event_id": event.event_id, "endpoint": lane.name}
            )
            return error
        finally:
            metrics.in_flight.dec()
        lane.note_answer(result.verdict is Verdict.DELIVERED)
        return result

    def _failed(self, event: ClaimedEvent, error: Exception, started: float) -> AttemptRecord:
        """The attempt of a delivery whose sending raised: a bug, counted as a failed attempt."""
        settings = self.state.settings
        outcome, delay = decide(
            Verdict.FAILED,
            attempts=event.attempts + int(event.counted),
            max_attempts=settings.relay_max_attempts,
            schedule=settings.relay_retry_schedule,
            counted=event.counted,
        )
        return AttemptRecord(
            id=event.id,
            claim_token=event.claim_token,
            status=outcome.value,
            delay=delay,
            attempted_at=time.time(),
            status_code=None,
            error=f"relay error: {error_text(error)}",
            tries=1,
            duration_ms=round((time.monotonic() - started) * 1000),
            counted=event.counted,
        )
