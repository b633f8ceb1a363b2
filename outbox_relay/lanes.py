"""A lane: one endpoint's share of a relay, so that one endpoint never delays another.

Each ACTIVE endpoint with a URL has a lane: its own keep-alive `CallbackClient` to its URL, its
`Deliverer` (signed with its secrets), its queue of claimed deliveries, its workers, and limits:
- `limit`: deliveries in flight at once, its share of RELAY_CONCURRENCY (at least 1), so that an
  endpoint that hangs until the timeout holds only its own workers;
- `low_water` / `max_held`: the claimer claims for the lane once no more than `low_water`
  deliveries are held (queued or in flight), up to `max_held`, so that claims stay batched while
  a busy lane's queue never runs dry, and one endpoint's backlog never fills another's room.
The endpoint loop (outbox_relay.endpoint_loop) opens, resizes and retires lanes as endpoints
change; the workers (outbox_relay.workers) drain their queues.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from outbox_relay.delivery import Deliverer
from outbox_relay.http import CallbackClient
from outbox_relay.outbox import ClaimedEvent
from payment_service.endpoints import Endpoint
from payment_service.signing import secret_key

# A claimed delivery and the monotonic time its lease ends; None tells a worker to stop.
QueueItem = tuple[ClaimedEvent, float] | None


def signing_keys(endpoint: Endpoint) -> tuple[bytes, ...]:
    """The HMAC keys that sign the endpoint's callbacks now (current, then those it replaced
    that still sign, newest first)."""
    return tuple(secret_key(secret) for secret in endpoint.signing_secrets())


def claimable(endpoint: Endpoint) -> bool:
    """Whether the relay delivers to the endpoint at all (its breaker aside)."""
    return endpoint.state == "ACTIVE" and endpoint.url is not None


@dataclass(eq=False)
class Lane:
    endpoint: Endpoint
    client: CallbackClient
    deliverer: Deliverer
    queue: asyncio.Queue[QueueItem] = field(default_factory=asyncio.Queue)
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    held: int = 0  # claimed and not finished: queued, waiting for a slot, or in flight
    in_flight: int = 0
    limit: int = 1
    low_water: int = 1
    max_held: int = 1
    retired: bool = False  # the endpoint went (removed, paused, new URL): finish, take no more
    slot_freed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def endpoint_id(self) -> int:
        return self.endpoint.endpoint_id

    def update(self, endpoint: Endpoint) -> None:
        """The same endpoint (and URL) read again: new secrets, types, breaker."""
        self.endpoint = endpoint
        self.deliverer.signing_keys = signing_keys(endpoint)

    def size(self, *, concurrency: int, batch_size: int, lanes: int) -> None:
        """Give the lane its share of the relay's workers and claim room."""
        lanes = max(lanes, 1)
        self.limit = max(1, math.ceil(concurrency / lanes))
        self.low_water = self.limit
        self.max_held = self.limit + max(1, math.ceil(batch_size / lanes))
        self.slot_freed.set()

    def budget(self, batch_size: int) -> int:
        """How many deliveries to claim for the lane now (0 while it holds enough)."""
        if self.retired or self.held > self.low_water:
            return 0
        return min(batch_size, self.max_held - self.held)
