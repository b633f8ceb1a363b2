"""The workers: each takes a claimed delivery off its lane's queue, sends it and hands the result
to the recorder.

A lane has as many workers as it could ever be allowed (RELAY_CONCURRENCY); `lane.limit` bounds
those sending at once, so that an endpoint that hangs until the timeout holds only its own
workers. A delivery is released, not sent, when the relay is stopping, its lane is retired, or it
waited in the queue until too close to the end of its lease (another relay may be about to take
it over).
"""

from __future__ import annotations

import asyncio
import logging
import time

from outbox_relay.lanes import Lane
from outbox_relay.outbox import AttemptRecord, ClaimedEvent
from outbox_relay.recorder import Recorder
from outbox_relay.schedule import Verdict, decide
from outbox_relay.state import RelayState, error_text

logger = logging.getLogger(__name__)


class Workers:
    """Starts and stops the workers of the relay's lanes."""

    def __init__(self, state: RelayState, recorder: Recorder) -> None:
        self.state = state
        self.recorder = recorder
        settings = state.settings
        # A delivery still queued this close to the end of its lease is released, not sent:
        # another relay may be about to take it over.
        self._lease_margin = min(settings.relay_request_timeout, settings.relay_lease_seconds / 2)

    def start(self, lane: Lane) -> None:
        # As many workers as the lane could ever be allowed; `lane.limit` bounds those sending.
        lane.workers = [
            asyncio.create_task(self._worker(lane))
            for _ in range(self.state.settings.relay_concurrency)
        ]

    def stop(self, lane: Lane) -> None:
        """Release every delivery still queued on the lane and tell its workers to stop."""
        while not lane.queue.empty():
            item = lane.queue.get_nowait()
            if item is not None:
                self.recorder.release(lane, item[0])
        for _ in lane.workers:
            lane.queue.put_nowait(None)
        lane.slot_freed.set()

    async def _take_slot(self, lane: Lane) -> bool:
        """Wait until the lane may send one more; False when it must not (stop, retired)."""
        stop = self.state.stop
        while lane.in_flight >= lane.limit:
            if stop.is_set() or lane.retired:
                return False
            lane.slot_freed.clear()
            await lane.slot_freed.wait()
        if stop.is_set() or lane.retired:
            return False
        lane.in_flight += 1
        return True

    async def _worker(self, lane: Lane) -> None:
        metrics = self.state.metrics
        recorder = self.recorder
        while True:
            item = await lane.queue.get()
            if item is None:
                return
            event, lease_deadline = item
            if not await self._take_slot(lane):
                recorder.release(lane, event)
                continue
            try:
                if time.monotonic() + self._lease_margin > lease_deadline:
                    recorder.release(lane, event)
                    continue
                metrics.in_flight.inc()
                try:
                    record = await lane.deliverer.deliver(event, lease_deadline=lease_deadline)
                except asyncio.CancelledError:
                    recorder.release(lane, event)
                    raise
                except Exception as error:  # a bug, not a receiver's failure: count it as one
                    logger.exception(
                        "delivery raised", extra={"event_id": event.event_id, "endpoint": lane.name}
                    )
                    record = self._failed_record(event, f"relay error: {error_text(error)}")
                finally:
                    metrics.in_flight.dec()
            finally:
                lane.in_flight -= 1
                lane.slot_freed.set()
            recorder.record(lane, record, event)

    def _failed_record(self, event: ClaimedEvent, error: str) -> AttemptRecord:
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
            error=error,
            tries=1,
            duration_ms=0,
            counted=event.counted,
        )
