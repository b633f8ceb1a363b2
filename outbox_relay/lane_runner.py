"""What each lane runs, started and stopped together: its pool, claim loop, recorder and workers.

`start` opens a lane's own connection pool (LANE_POOL_SIZE connections, opened when first used)
and starts its claim loop (outbox_relay.claimer, supervised: restarted after a delay when it
fails), its recorder (outbox_relay.recorder) and its workers (outbox_relay.workers). `retire`
stops its claiming and releases what it has not started; `close` then lets the rest finish,
writes the last results and closes its pool and HTTP client. At shutdown the relay stops every
lane in the same order, all lanes at once (`Relay._drain`).
"""

from __future__ import annotations

import asyncio

from outbox_relay.claimer import Claimer
from outbox_relay.lanes import LANE_POOL_SIZE, Lane
from outbox_relay.recorder import Recorder
from outbox_relay.state import RelayState, close_pool, supervise
from outbox_relay.workers import Workers
from payment_service.database import create_pool, keep_session

# A lane's connections close after this long unused (an endpoint whose breaker is open claims
# nothing for minutes).
IDLE_CONNECTION_SECONDS = 60.0


class LaneRunner:
    """Starts, retires and closes what each lane runs."""

    def __init__(
        self, state: RelayState, claimer: Claimer, recorder: Recorder, workers: Workers
    ) -> None:
        self.state = state
        self.claimer = claimer
        self.recorder = recorder
        self.workers = workers

    def start(self, lane: Lane) -> None:
        self.workers.start(lane)
        opened = asyncio.create_task(self._open_pool(lane))
        lane.claiming = asyncio.create_task(self._claim(lane, opened))
        lane.recording = asyncio.create_task(self._record(lane, opened))

    def stop_claiming(self, lane: Lane) -> None:
        """No more claims for the lane (retired, or the relay stops): its claim loop ends."""
        lane.wake.set()
        lane.slot_freed.set()

    def retire(self, lane: Lane) -> None:
        """Stop claiming for the lane and release what it has not started."""
        lane.retired = True
        self.stop_claiming(lane)
        self.workers.stop(lane)

    async def close(self, lane: Lane) -> None:
        """After `retire`: let what is in flight finish, write the last results, close the
        lane's connections."""
        if lane.claiming is not None:
            await asyncio.gather(lane.claiming, return_exceptions=True)
        await asyncio.gather(*lane.workers, return_exceptions=True)
        # then the quick retries, every worker's included (a retry starts no other)
        await asyncio.gather(*lane.retries, return_exceptions=True)
        self.recorder.close(lane)
        if lane.recording is not None:
            await asyncio.gather(lane.recording, return_exceptions=True)
        await self.close_connections(lane)

    async def close_connections(self, lane: Lane) -> None:
        """Close the lane's HTTP connections and its pool (once; again does nothing)."""
        await lane.client.aclose()
        pool, lane.pool = lane.pool, None
        await close_pool(pool)

    async def _open_pool(self, lane: Lane) -> None:
        # min_size 0: no connection until the lane needs one, so a lane starts (and waits) while
        # the database is down. `keep_session`: a connection goes back as it is, without
        # asyncpg's reset round trip, as the API's do; a lane leaves no session state (no SET,
        # LISTEN or session advisory lock: housekeeping's lock is on the relay's own pool).
        lane.pool = await create_pool(
            self.state.settings.dsn(),
            min_size=0,
            max_size=LANE_POOL_SIZE,
            max_inactive_connection_lifetime=IDLE_CONNECTION_SECONDS,
            reset=keep_session,
        )

    async def _claim(self, lane: Lane, opened: asyncio.Task[None]) -> None:
        await asyncio.shield(opened)
        await supervise(
            self.state,
            "claimer",
            lambda: self.claimer.run(lane),
            done=lambda: lane.retired,
            endpoint=lane.name,
        )

    async def _record(self, lane: Lane, opened: asyncio.Task[None]) -> None:
        await asyncio.shield(opened)
        await self.recorder.run(lane)
