"""A lane: one endpoint's share of a relay, so that one endpoint never delays another.

Each ACTIVE endpoint with a URL has a lane, and everything a lane does costs only that lane:
- its own keep-alive `CallbackClient` to its URL and its `Deliverer` (signed with its secrets);
- its own small connection pool (`pool`, LANE_POOL_SIZE connections): the lane's claims and the
  writes of its results run on it (outbox_relay.claimer, outbox_relay.recorder), so a slow
  statement for one endpoint never holds a connection another endpoint waits for;
- its queue of claimed deliveries and its workers (outbox_relay.workers), with limits:
  - `limit`: deliveries in flight at once, its share of RELAY_CONCURRENCY (at least 1), so that
    an endpoint that hangs until the timeout holds only its own workers;
  - `in_flight_allowed`: of those, what its endpoint's answers earn: `limit` times the square of
    `answered` (the share of its recent tries answered 2xx), at least 1. A try costs the relay's
    CPU whatever the answer; when that CPU runs short, each lane gets about its share of tries in
    flight, so an endpoint failing half its tries keeps a quarter of its slots and the others keep
    theirs. On a relay with CPU to spare even one slot sends hundreds of tries a second (a try is
    a round trip of a millisecond or two), so a flapping endpoint still drains;
  - `low_water` / `max_held`: the lane claims once no more than `low_water` deliveries are held
    (queued or in flight), up to `max_held`, so that claims stay batched while a busy lane's
    queue never runs dry;
  - `max_waiting`: deliveries whose failed try waits out a quick retry hold no worker and no
    slot, and are not `held` (the lane goes on claiming and sending meanwhile); at most
    MAX_WAITING_PER_LANE of them at once, beyond which a failed try is the attempt's result;
- `unwritten`: the results, releases and lost claims its recorder has still to write.
The endpoint loop (outbox_relay.endpoint_loop) opens, resizes and retires lanes as endpoints
change; outbox_relay.lane_runner starts and stops what each lane runs.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass, field

import asyncpg

from outbox_relay.delivery import Deliverer
from outbox_relay.http import CallbackClient
from outbox_relay.outbox import AttemptRecord, ClaimedEvent
from payment_service.database import PooledConnection, acquire
from payment_service.endpoints import Endpoint
from payment_service.signing import secret_key

# A claimed delivery and the monotonic time its lease ends; None tells a worker to stop.
QueueItem = tuple[ClaimedEvent, float] | None

LANE_POOL_SIZE = 2  # the lane's claims, the writes of its results
# `answered` follows a lane's tries: each moves it this much of the way to 1 (2xx) or 0 (anything
# else), so it reflects about the last 1 / ANSWERED_WEIGHT tries.
ANSWERED_WEIGHT = 0.05
# Deliveries of one lane waiting out a quick retry at once. Each costs a lease already held and a
# timer; the cap only bounds what a relay holds when an endpoint fails nearly every try. At a few
# tenths of a second per wait it lets a lane retry thousands of deliveries a second.
MAX_WAITING_PER_LANE = 1000


def signing_keys(endpoint: Endpoint) -> tuple[bytes, ...]:
    """The HMAC keys that sign the endpoint's callbacks now (current, then those it replaced
    that still sign, newest first)."""
    return tuple(secret_key(secret) for secret in endpoint.signing_secrets())


def claimable(endpoint: Endpoint) -> bool:
    """Whether the relay delivers to the endpoint at all (its breaker aside)."""
    return endpoint.state == "ACTIVE" and endpoint.url is not None


@dataclass(eq=False)
class Unwritten:
    """What a lane's recorder has still to write, and the event that tells it there is some."""

    records: list[AttemptRecord] = field(default_factory=list)
    releases: list[tuple[int, uuid.UUID]] = field(default_factory=list)
    # Tokens of claims whose answer was lost: their leases are ended once the database answers.
    lost_claims: list[uuid.UUID] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False  # write what is left, then stop

    def __len__(self) -> int:
        return len(self.records) + len(self.releases) + len(self.lost_claims)


@dataclass(eq=False)
class Lane:
    endpoint: Endpoint
    client: CallbackClient
    deliverer: Deliverer
    queue: asyncio.Queue[QueueItem] = field(default_factory=asyncio.Queue)
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    retries: set[asyncio.Task[None]] = field(default_factory=set)  # quick retries waiting
    held: int = 0  # claimed and not finished: queued, waiting for a slot, or in flight
    in_flight: int = 0
    waiting: int = 0  # claimed, a try failed, waiting out a quick retry (not in `held`)
    limit: int = 1
    low_water: int = 1
    max_held: int = 1
    max_waiting: int = MAX_WAITING_PER_LANE
    answered: float = 1.0  # the share of its recent tries answered 2xx (see ANSWERED_WEIGHT)
    retired: bool = False  # the endpoint went (removed, paused, new URL): finish, take no more
    slot_freed: asyncio.Event = field(default_factory=asyncio.Event)
    # Something may be claimable for this lane: news from the API, a delivery that unblocks the
    # next one of its payment, room again, a change of its endpoint.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    unwritten: Unwritten = field(default_factory=Unwritten)
    pool: asyncpg.Pool | None = None  # opened by outbox_relay.lane_runner
    claiming: asyncio.Task[None] | None = None  # the lane's claim loop
    recording: asyncio.Task[None] | None = None  # the lane's recorder

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

    @property
    def in_flight_allowed(self) -> int:
        """Tries it may have on the wire at once: its `limit`, as its endpoint's answers earn."""
        return max(1, round(self.limit * self.answered * self.answered))

    def note_answer(self, delivered: bool) -> None:
        """One try's answer: 2xx (`delivered`) or not."""
        self.answered += ANSWERED_WEIGHT * (float(delivered) - self.answered)

    def budget(self, batch_size: int) -> int:
        """How many deliveries to claim for the lane now (0 while it holds enough)."""
        if self.retired or self.held > self.low_water:
            return 0
        return min(batch_size, self.max_held - self.held)

    def let_go(self) -> None:
        """One held delivery is no longer held (finished, released, or waiting out a quick
        retry): once the lane is down to its low water mark, it claims again."""
        self.held -= 1
        if self.held == self.low_water:
            self.wake.set()

    def connection(self) -> PooledConnection:
        """A connection of the lane's own pool, waited for as long as it takes."""
        assert self.pool is not None, "the lane's pool is opened by its runner"
        return acquire(self.pool, timeout=None)
