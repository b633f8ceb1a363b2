"""The endpoint loop: keeps the relay's lanes (outbox_relay.lanes) in step with the endpoints.

It seeds the endpoints from the settings once at start (`seed_from_settings`: with only
NOTIFICATION_SERVICE_URL the relay behaves as before subscriptions), then reads them every second,
and at once when the listener hears a change on ENDPOINTS_CHANNEL. Each ACTIVE endpoint with a URL
gets a lane; the lane of an endpoint that went (removed, paused, disabled, or given a new URL) is
retired: what it has not started is released, the rest finishes, then its connections close
(outbox_relay.lane_runner runs each lane: its pool, claim loop, recorder and workers).
Every change of an endpoint's state or breaker it sees is logged, whoever made it.

Each lane opens in its own guard. An endpoint the relay cannot deliver to (a URL no request can be
made to, written by hand or by an older version that checked less) is DISABLED with the reason,
logged and counted (`relay_unservable_endpoints_total`), and every other endpoint goes on.
"""

from __future__ import annotations

import asyncio
import logging

from outbox_relay.delivery import Deliverer
from outbox_relay.http import CallbackClient
from outbox_relay.lane_runner import LaneRunner
from outbox_relay.lanes import Lane, claimable, signing_keys
from outbox_relay.state import RelayState, error_text, wait_for
from payment_service import __version__
from payment_service.callback_urls import CallbackURLError
from payment_service.endpoints import (
    Endpoint,
    disable_unservable,
    seed_from_settings,
    select_endpoints,
)

logger = logging.getLogger(__name__)

ENDPOINT_RELOAD_SECONDS = 1.0  # endpoints are read again at least this often


class EndpointLoop:
    """The loop (`run`) that opens, resizes and retires the lanes."""

    def __init__(self, state: RelayState, runner: LaneRunner) -> None:
        self.state = state
        self.runner = runner
        # (state, breaker) of every endpoint as last read, to log the changes the relay sees
        self._endpoint_states: dict[int, tuple[str, str]] = {}
        self._endpoints_loaded = False
        self._seeded = False
        self.closers: set[asyncio.Task[None]] = set()  # retired lanes' closing tasks

    async def run(self) -> None:
        """Seed once, then keep the lanes in step with the endpoints (every second, or at once
        on a NOTIFY)."""
        state = self.state
        while True:
            state.endpoints_changed.clear()
            async with state.connection() as conn:
                if not self._seeded:
                    for note in await seed_from_settings(conn, state.settings):
                        log = logger.warning if note.warning else logger.info
                        log(note.text, extra={"endpoint": note.endpoint, "seeding": note.action})
                    self._seeded = True
                found = await select_endpoints(conn)
            unservable = self.apply(found)
            if unservable:
                await self._disable(unservable)
            await wait_for(state.endpoints_changed, ENDPOINT_RELOAD_SECONDS)

    def apply(self, found: list[Endpoint]) -> list[tuple[Endpoint, str]]:
        """Open a lane for each endpoint now delivered to, retire the lanes of those that went
        (removed, paused, disabled, or given a new URL), refresh the others. Returns the
        endpoints whose lane could not open, each with the reason."""
        lanes = self.state.lanes
        settings = self.state.settings
        wanted = {e.endpoint_id: e for e in found if claimable(e)}
        breaker_changed = self._note_states(found)
        changed = False
        unservable: list[tuple[Endpoint, str]] = []
        for endpoint_id, lane in list(lanes.items()):
            endpoint = wanted.get(endpoint_id)
            if endpoint is None or endpoint.url != lane.endpoint.url:
                self._retire(lane, endpoint)
                changed = True
        for endpoint_id, endpoint in wanted.items():
            if endpoint_id in lanes:
                lanes[endpoint_id].update(endpoint)
                continue
            try:
                lanes[endpoint_id] = self._open_lane(endpoint)
            except Exception as error:  # this endpoint's trouble only: the others go on
                unservable.append((endpoint, _unservable_reason(endpoint, error)))
                continue
            changed = True
        if changed:
            for lane in lanes.values():
                lane.size(
                    concurrency=settings.relay_concurrency,
                    batch_size=settings.relay_batch_size,
                    lanes=len(lanes),
                )
        if changed or breaker_changed or not self._endpoints_loaded:
            self._endpoints_loaded = True
            self.state.wake_lanes()
        return unservable

    async def _disable(self, unservable: list[tuple[Endpoint, str]]) -> None:
        """DISABLE the endpoints the relay cannot deliver to, each with its reason, unless it
        changed meanwhile (a new URL, a state set by an operator): the next read looks again."""
        metrics = self.state.metrics
        async with self.state.connection() as conn:
            for endpoint, reason in unservable:
                assert endpoint.url is not None
                if not await disable_unservable(
                    conn, endpoint.endpoint_id, url=endpoint.url, reason=reason
                ):
                    continue
                logger.error(
                    "endpoint disabled: the relay cannot deliver to it",
                    extra={"endpoint": endpoint.name, "reason": reason},
                )
                metrics.unservable_endpoints.labels(endpoint.name).inc()
                metrics.endpoint_state_changes.labels(endpoint.name, "disabled").inc()

    def _note_states(self, found: list[Endpoint]) -> bool:
        """Log every change of an endpoint's state or breaker since the last read (whoever made
        it: this relay, another, or an operator); True when a breaker changed (the claimer must
        look again: a half-open breaker may probe, a closed one claim)."""
        seen = {e.endpoint_id: (e.state, e.breaker) for e in found}
        breaker_changed = False
        for endpoint in found:
            before = self._endpoint_states.get(endpoint.endpoint_id)
            now = seen[endpoint.endpoint_id]
            if before is None or before == now:
                continue
            breaker_changed |= before[1] != now[1]
            logger.info(
                "endpoint health seen",
                extra={
                    "endpoint": endpoint.name,
                    "state": now[0],
                    "breaker": now[1],
                    "was": {"state": before[0], "breaker": before[1]},
                    "reason": endpoint.state_reason,
                },
            )
        self._endpoint_states = seen
        return breaker_changed

    def _open_lane(self, endpoint: Endpoint) -> Lane:
        """The endpoint's lane, its workers started; raises when the relay cannot deliver to it
        (CallbackURLError for its URL)."""
        settings = self.state.settings
        assert endpoint.url is not None
        client = CallbackClient(
            endpoint.url,
            networks=settings.callback_networks,
            max_connections=settings.relay_concurrency,
            timeout=settings.relay_request_timeout,
            user_agent=f"payment-service-relay/{__version__}",
        )
        deliverer = Deliverer(
            client,
            signing_keys=signing_keys(endpoint),
            request_timeout=settings.relay_request_timeout,
            quick_retries=settings.relay_quick_retries,
            quick_retry_wait=settings.relay_quick_retry_wait,
            max_attempts=settings.relay_max_attempts,
            schedule=settings.relay_retry_schedule,
            stopping=self.state.stop.is_set,
            endpoint=endpoint.name,
        )
        lane = Lane(endpoint, client, deliverer)
        self.runner.start(lane)
        logger.info(
            "delivering to endpoint",
            extra={
                "endpoint": endpoint.name,
                "url": client.url.without_credentials(),
                "event_types": list(endpoint.event_types),
                "signed": bool(endpoint.signing_secrets()),
            },
        )
        if not endpoint.signing_secrets():
            logger.warning(
                "endpoint has no signing secret: its callbacks are sent unsigned",
                extra={"endpoint": endpoint.name},
            )
        return lane

    def _retire(self, lane: Lane, now: Endpoint | None) -> None:
        """Stop delivering to a lane: release what it has not started, let the rest finish,
        then close its connections."""
        del self.state.lanes[lane.endpoint_id]
        self.state.retiring.add(lane)
        self.runner.retire(lane)
        logger.info(
            "no longer delivering to endpoint",
            extra={
                "endpoint": lane.name,
                "state": None if now is None else now.state,
                "reason": "removed" if now is None else ("url changed" if now.url else "no url"),
            },
        )
        closer = asyncio.create_task(self._close_lane(lane))
        self.closers.add(closer)
        closer.add_done_callback(self.closers.discard)

    async def _close_lane(self, lane: Lane) -> None:
        await self.runner.close(lane)
        self.state.retiring.discard(lane)


def _unservable_reason(endpoint: Endpoint, error: Exception) -> str:
    """What an unservable endpoint's state_reason says (never its URL: it may hold a password)."""
    if isinstance(error, CallbackURLError):
        return f"the relay cannot deliver to its URL: {error}"
    logger.error(
        "could not open the endpoint's lane", extra={"endpoint": endpoint.name}, exc_info=error
    )
    return f"the relay cannot deliver to it: {error_text(error)}"
