"""The relay's SQL on `deliveries` (one per event and subscribed endpoint) and `outbox_events`.

The relay leases deliveries, sends each event's payload to the delivery's endpoint, and writes the
outcome back on the delivery; an event is only read (its payload) and, once no delivery needs it
any more, deleted by housekeeping. Every function takes the connection first and runs one short
statement: no transaction is ever held open while a callback is in flight. A claim leases rows
with a token; every later write to a claimed row checks that token, so a relay whose lease ran
out cannot overwrite a newer claim.
The statements are module constants so that the tests can EXPLAIN exactly what runs; each is
whole, its `$n` numbered in place. The API's tables are not read here: housekeeping purges expired
idempotency keys through the schema's `purge_expired_idempotency_keys` (db/migrations/0005).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg

# pg_advisory_lock key of housekeeping, one relay at a time ("outboxhk" in ASCII).
HOUSEKEEPING_LOCK_ID = 0x6F7574626F78686B

ERROR_TEXT_LIMIT = 300  # characters of an error kept on the row and in its attempt log
MIN_STATUS_CODE, MAX_STATUS_CODE = 100, 599  # what the CHECK on last_status_code allows
MAX_EPOCH_SECONDS = 1e11  # about the year 5138; PostgreSQL's timestamps go further
# Characters PostgreSQL text and jsonb reject (NUL), or UTF-8 cannot encode (lone surrogates).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")

# The claim of one endpoint's lane (each lane claims for itself, on its own connection: see
# outbox_relay.lanes): `$1` the endpoint, `$2` how many deliveries it may lease now. An endpoint
# that is not ACTIVE, has no URL or whose breaker is not closed gets nothing, even when the relay's
# copy of it is a moment old (a half-open breaker's one probe goes through PROBE_CLAIM_SQL).
# Read through deliveries_due_idx in its order; order per (endpoint, payment) through
# deliveries_pending_aggregate_idx. Order follows the EVENT's id (deliveries.event_id =
# outbox_events.id), not delivery_id: `outbox replay --since` may add a delivery for an older
# event after a newer event's is already pending.
CLAIM_SQL = """
WITH due AS (
    SELECT d.delivery_id
      FROM deliveries AS d
     WHERE d.endpoint_id = $1
       AND d.status = 'PENDING'
       AND d.next_attempt_at <= now()
       -- not leased, or the lease of a relay that died has run out
       AND (d.locked_until IS NULL OR d.locked_until < now())
       -- order per (endpoint, payment): only the earliest pending delivery of a payment to this
       -- endpoint may go; a DEAD one no longer blocks the ones after it. (A scalar subquery, one
       -- index probe per candidate: as NOT EXISTS the planner may choose an anti join that scans
       -- every pending delivery of the endpoint per candidate.)
       AND d.event_id = (SELECT min(earliest.event_id)
                           FROM deliveries AS earliest
                          WHERE earliest.endpoint_id = d.endpoint_id
                            AND earliest.aggregate_id = d.aggregate_id
                            AND earliest.status = 'PENDING')
       -- the endpoint, as it is now (evaluated once)
       AND EXISTS (SELECT 1
                     FROM endpoints AS ep
                    WHERE ep.endpoint_id = $1
                      AND ep.state = 'ACTIVE'
                      AND ep.url IS NOT NULL
                      AND ep.breaker_open_until IS NULL)
     ORDER BY d.next_attempt_at, d.event_id
     LIMIT $2
       FOR UPDATE OF d SKIP LOCKED
)
UPDATE deliveries AS o
   SET locked_until = now() + make_interval(secs => $3),
       claim_token = $4
  FROM due, outbox_events AS e
 WHERE o.delivery_id = due.delivery_id
   AND e.id = o.event_id
RETURNING o.delivery_id, o.endpoint_id, e.event_id::text, o.aggregate_id, e.payload,
          o.counted_attempts, extract(epoch FROM e.created_at)::float8 AS created_at
"""

# The one probe of a half-open breaker (the relay holds the probe's lease, see
# outbox_relay.endpoint_health.lease_probe): `$1` the endpoint. The earliest pending delivery in
# (endpoint, payment) order, due or not: while the breaker is not closed its cooldown is the
# schedule, so recovery never waits for one delivery's own backoff.
PROBE_CLAIM_SQL = """
WITH probe AS (
    SELECT d.delivery_id
      FROM deliveries AS d
      JOIN endpoints AS ep ON ep.endpoint_id = d.endpoint_id
     WHERE d.endpoint_id = $1
       AND ep.state = 'ACTIVE'
       AND ep.url IS NOT NULL
       AND d.status = 'PENDING'
       AND (d.locked_until IS NULL OR d.locked_until < now())
       AND d.event_id = (SELECT min(earliest.event_id)
                           FROM deliveries AS earliest
                          WHERE earliest.endpoint_id = d.endpoint_id
                            AND earliest.aggregate_id = d.aggregate_id
                            AND earliest.status = 'PENDING')
     ORDER BY d.next_attempt_at, d.event_id
     LIMIT 1
       FOR UPDATE OF d SKIP LOCKED
)
UPDATE deliveries AS o
   SET locked_until = now() + make_interval(secs => $2),
       claim_token = $3
  FROM probe, outbox_events AS e
 WHERE o.delivery_id = probe.delivery_id
   AND e.id = o.event_id
RETURNING o.delivery_id, o.endpoint_id, e.event_id::text, o.aggregate_id, e.payload,
          o.counted_attempts, extract(epoch FROM e.created_at)::float8 AS created_at
"""

RECORD_SQL = """
WITH attempt AS (
    SELECT *
      FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::float8[], $5::float8[], $6::int[],
                  $7::text[], $8::int[], $9::int[], $10::bool[])
           AS a(id, claim_token, status, delay, attempted_at, status_code, error, tries,
                duration_ms, counted)
), written AS (
    UPDATE deliveries AS o
       SET status = a.status,
           attempts = o.attempts + 1,
           counted_attempts = o.counted_attempts + CASE WHEN a.counted THEN 1 ELSE 0 END,
           next_attempt_at = CASE WHEN a.status = 'PENDING'
                                  THEN now() + make_interval(secs => a.delay)
                                  ELSE o.next_attempt_at END,
           delivered_at = CASE WHEN a.status = 'DELIVERED' THEN now() END,
           locked_until = NULL,
           claim_token = NULL,
           last_error = a.error,
           last_status_code = a.status_code,
           last_attempt_at = to_timestamp(a.attempted_at),
           attempt_log = o.attempt_log || jsonb_build_object(
               'attempt', o.attempts + 1,
               'at', to_timestamp(a.attempted_at),
               'outcome', a.status,
               'status_code', a.status_code,
               'error', a.error,
               'tries', a.tries,
               'duration_ms', a.duration_ms)
      FROM attempt AS a
     WHERE o.delivery_id = a.id
       AND o.claim_token = a.claim_token
 RETURNING o.delivery_id, o.endpoint_id, o.aggregate_id, o.event_id
)
-- `unblocks`: a delivery of a later event of the same payment to the same endpoint was waiting
-- for this one
SELECT w.delivery_id,
       w.endpoint_id,
       EXISTS (SELECT 1
                 FROM deliveries AS later
                WHERE later.endpoint_id = w.endpoint_id
                  AND later.aggregate_id = w.aggregate_id
                  AND later.status = 'PENDING'
                  AND later.event_id > w.event_id) AS unblocks
  FROM written AS w
"""

RELEASE_SQL = """
UPDATE deliveries AS o
   SET locked_until = NULL,
       claim_token = NULL
  FROM unnest($1::bigint[], $2::uuid[]) AS c(id, claim_token)
 WHERE o.delivery_id = c.id
   AND o.claim_token = c.claim_token
"""

# The leases of claims whose answer never came (the connection broke while the claim ran): the
# relay chose each claim's token before sending it, so once the database answers again it ends
# exactly the leases that claim may have taken, instead of leaving them to run out.
RELEASE_TOKENS_SQL = """
UPDATE deliveries
   SET locked_until = NULL,
       claim_token = NULL
 WHERE claim_token = ANY ($1::uuid[])
   AND status = 'PENDING'
"""

# What became of attempts whose write found no row with their claim token: `mine`, already on
# its row (a write whose commit reached the database, and on failover the standby, but whose
# answer was lost, written again; each attempt's log entry carries its `at`, the attempt's own
# time to the microsecond); `gone`, no row at all (deleted while in flight: its endpoint was
# removed); neither: another relay took the delivery over when the lease ran out.
RECORDED_ALREADY_SQL = """
SELECT a.id,
       d.delivery_id IS NULL AS gone,
       coalesce(d.attempt_log @> jsonb_build_array(
                    jsonb_build_object('at', to_timestamp(a.attempted_at))), false) AS mine
  FROM unnest($1::bigint[], $2::float8[]) AS a(id, attempted_at)
  LEFT JOIN deliveries AS d ON d.delivery_id = a.id
"""

# The relay's gauges, per endpoint (every few seconds): pending deliveries, the oldest one's age,
# dead ones, the endpoint's state and its breaker. Read through the partial indexes on PENDING and
# DEAD rows, so the cost follows the backlog, not the retained history.
ENDPOINT_BACKLOG_SQL = """
SELECT ep.name,
       pending.n AS pending,
       pending.oldest_age_seconds,
       dead.n AS dead,
       ep.state,
       CASE WHEN ep.breaker_open_until IS NULL THEN 'closed'
            WHEN ep.breaker_open_until > now() THEN 'open'
            ELSE 'half_open' END AS breaker
  FROM endpoints AS ep
 CROSS JOIN LATERAL (
        SELECT count(*) AS n,
               extract(epoch FROM now() - min(d.created_at))::float8 AS oldest_age_seconds
          FROM deliveries AS d
         WHERE d.endpoint_id = ep.endpoint_id
           AND d.status = 'PENDING') AS pending
 CROSS JOIN LATERAL (
        SELECT count(*) AS n
          FROM deliveries AS d
         WHERE d.endpoint_id = ep.endpoint_id
           AND d.status = 'DEAD') AS dead
 ORDER BY ep.name
"""

# Housekeeping (outbox_relay.housekeeping runs these in rounds of short statements).
#
# Deliveries delivered past retention, oldest first, through deliveries_delivered_at_idx; each
# deleted one's event comes back, as it may now be unused. The conditions are repeated outside
# the sub-select so that a row changed meanwhile (put back in line by `outbox replay`, say) is
# re-checked against its new version before it is deleted.
DELETE_DELIVERED_SQL = """
DELETE FROM deliveries
 WHERE delivery_id = ANY (ARRAY(SELECT delivery_id
                                  FROM deliveries
                                 WHERE status = 'DELIVERED'
                                   AND delivered_at < now() - make_interval(secs => $1)
                                 ORDER BY delivered_at
                                 LIMIT $2))
   AND status = 'DELIVERED'
   AND delivered_at < now() - make_interval(secs => $1)
RETURNING event_id
"""

# The sweep: the next $3 events after id $1, in id order (the primary key), each saying whether it
# is past retention and whether it is unused (no delivery left). It finds the unused events that
# no deleted delivery led to: no endpoint wanted them, or `endpoints remove` dropped their
# deliveries. A window has a fixed size however many of its events are still needed (pending or
# dead deliveries), so a pass reads each old event once, instead of every batch reading again the
# growing head of events kept (a search for "the oldest unused events" costs all the old events
# on every batch: 250 ms a batch with 200,000 of them). Each event's deliveries are looked up
# through the (event_id, endpoint_id) key, one probe per event: as NOT EXISTS the planner may
# choose to hash every delivery instead.
SWEEP_EVENTS_SQL = """
SELECT w.id,
       w.created_at < now() - make_interval(secs => $2) AS past_retention,
       d.event_id IS NULL AS unused
  FROM (SELECT e.id, e.created_at
          FROM outbox_events AS e
         WHERE e.id > $1
         ORDER BY e.id
         LIMIT $3) AS w
  LEFT JOIN LATERAL (SELECT d.event_id
                       FROM deliveries AS d
                      WHERE d.event_id = w.id
                      LIMIT 1) AS d ON true
 ORDER BY w.id
"""

# Deleting unused events is two statements in one short transaction. First, lock those of these
# events that are past retention and unused, skipping any locked elsewhere: `outbox replay
# --since` holds the events it is adding deliveries for (FOR KEY SHARE), and its deliveries are
# not visible here until it commits.
LOCK_UNUSED_EVENTS_SQL = """
SELECT e.id
  FROM outbox_events AS e
 WHERE e.id = ANY ($1::bigint[])
   AND e.created_at < now() - make_interval(secs => $2)
   AND NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.event_id = e.id)
 FOR UPDATE SKIP LOCKED
"""

# Then delete them, checking again with this statement's own snapshot, taken once the locks are
# held: a delivery committed after the lock statement's snapshot but before it locked the event
# (a replay that finished in between) is seen here and keeps its event; the locks keep any new
# one out until the transaction ends.
DELETE_UNUSED_EVENTS_SQL = """
DELETE FROM outbox_events AS e
 WHERE e.id = ANY ($1::bigint[])
   AND NOT EXISTS (SELECT 1 FROM deliveries AS d WHERE d.event_id = e.id)
"""


@dataclass(slots=True)
class ClaimedEvent:
    """One leased delivery: an event on its way to one endpoint."""

    id: int  # the delivery's id
    endpoint_id: int
    event_id: str  # the event's uuid: `webhook-id` at every endpoint
    aggregate_id: int
    body: bytes  # the payload jsonb as text, sent byte for byte
    attempts: int  # attempts made before this claim that count toward RELAY_MAX_ATTEMPTS
    created_at: float  # epoch seconds
    claim_token: uuid.UUID
    # False: this attempt does not count toward RELAY_MAX_ATTEMPTS (a probe of a half-open
    # breaker: endpoint health), so it cannot make the delivery DEAD.
    counted: bool = True


@dataclass(slots=True)
class AttemptRecord:
    """What one attempt did, as written to the row; `status` is the row's new status."""

    id: int
    claim_token: uuid.UUID
    status: str  # PENDING (rescheduled), DELIVERED or DEAD
    delay: float  # seconds until the next attempt when rescheduled
    attempted_at: float  # epoch seconds
    status_code: int | None
    error: str | None
    tries: int
    duration_ms: int
    # False: the attempt is recorded but does not count toward RELAY_MAX_ATTEMPTS (endpoint
    # health: attempts made while an endpoint's breaker is not closed).
    counted: bool = True


class Written(NamedTuple):
    """A delivery whose attempt was written."""

    id: int
    endpoint_id: int
    unblocks: bool  # a later delivery of its payment to its endpoint was waiting for it


def safe_text(text: str | None, *, limit: int = ERROR_TEXT_LIMIT) -> str | None:
    """`text` cut to `limit` characters, as PostgreSQL text and jsonb take it: no NUL, no lone
    surrogate (each becomes a replacement character); None stays None."""
    if text is None:
        return None
    return _UNSTORABLE.sub("\ufffd", text[:limit])


def storable_epoch(seconds: float) -> float:
    """An attempt's time (epoch seconds) as a row can hold it: itself, or the epoch when outside
    what `to_timestamp` takes (it never is, coming from the clock; a refused one is written bare
    with this, and looked for with it)."""
    return seconds if 0 <= seconds < MAX_EPOCH_SECONDS else 0.0


def safe_status_code(code: int | None) -> int | None:
    """An HTTP status code the row can hold: None for one outside 100-599."""
    return code if code is not None and MIN_STATUS_CODE <= code <= MAX_STATUS_CODE else None


async def claim_deliveries(
    conn: asyncpg.Connection,
    endpoint_id: int,
    *,
    limit: int,
    lease_seconds: float,
    token: uuid.UUID | None = None,
) -> list[ClaimedEvent]:
    """Lease up to `limit` of an endpoint's due deliveries, oldest first, at most one per
    payment; none while its breaker is not closed. `token`: the claim's token, chosen by the
    caller so that it can release the claim if the answer is lost."""
    token = token or uuid.uuid4()
    rows = await conn.fetch(CLAIM_SQL, endpoint_id, limit, lease_seconds, token)
    return [_claimed(row, token) for row in rows]


async def claim_probe(
    conn: asyncpg.Connection,
    endpoint_id: int,
    *,
    lease_seconds: float,
    token: uuid.UUID | None = None,
) -> ClaimedEvent | None:
    """Lease the delivery that probes a half-open breaker (PROBE_CLAIM_SQL); None when the
    endpoint has nothing to send. Its attempt does not count toward RELAY_MAX_ATTEMPTS."""
    token = token or uuid.uuid4()
    row = await conn.fetchrow(PROBE_CLAIM_SQL, endpoint_id, lease_seconds, token)
    return None if row is None else _claimed(row, token, counted=False)


def _claimed(row: asyncpg.Record, token: uuid.UUID, *, counted: bool = True) -> ClaimedEvent:
    return ClaimedEvent(
        row[0], row[1], row[2], row[3], row[4].encode(), row[5], row[6], token, counted
    )


async def record_attempts(
    conn: asyncpg.Connection, records: Sequence[AttemptRecord]
) -> list[Written]:
    """Write a batch of finished attempts in one statement and end their leases.

    Rows whose claim token changed (the lease ran out and another relay took the delivery) are
    left alone. Returns each row written. Whatever a receiver answered, the status code and error
    are made safe to store here (see `safe_text`, `safe_status_code`).
    """
    rows = await conn.fetch(
        RECORD_SQL,
        [r.id for r in records],
        [r.claim_token for r in records],
        [r.status for r in records],
        [r.delay for r in records],
        [r.attempted_at for r in records],
        [safe_status_code(r.status_code) for r in records],
        [safe_text(r.error) for r in records],
        [r.tries for r in records],
        [r.duration_ms for r in records],
        [r.counted for r in records],
    )
    return [Written(row[0], row[1], row[2]) for row in rows]


async def release_claims(conn: asyncpg.Connection, claims: Sequence[tuple[int, uuid.UUID]]) -> int:
    """End leases without an attempt (shutdown): the deliveries are due again at once."""
    result = await conn.execute(
        RELEASE_SQL, [claim[0] for claim in claims], [claim[1] for claim in claims]
    )
    return int(result.split()[-1])


async def release_claim_tokens(conn: asyncpg.Connection, tokens: Sequence[uuid.UUID]) -> int:
    """End every lease taken by these claims (whose answers were lost): due again at once."""
    result = await conn.execute(RELEASE_TOKENS_SQL, list(tokens))
    return int(result.split()[-1])


class Fates(NamedTuple):
    """What became of attempts not written (RECORDED_ALREADY_SQL), by delivery id."""

    mine: set[int]  # written already: the answer of an earlier write was lost
    gone: set[int]  # the delivery no longer exists (its endpoint was removed)


async def recorded_already(conn: asyncpg.Connection, records: Sequence[AttemptRecord]) -> Fates:
    """Which of these attempts are written on their rows already, and whose rows are gone."""
    rows = await conn.fetch(
        RECORDED_ALREADY_SQL,
        [r.id for r in records],
        [storable_epoch(r.attempted_at) for r in records],
    )
    return Fates({row[0] for row in rows if row[2]}, {row[0] for row in rows if row[1]})


async def select_endpoint_backlog(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Per endpoint (by name): pending deliveries, the oldest one's age in seconds (None if
    none), dead deliveries, state, breaker. See ENDPOINT_BACKLOG_SQL."""
    return await conn.fetch(ENDPOINT_BACKLOG_SQL)  # type: ignore[no-any-return]


# -- inspection and operation -------------------------------------------------------------------
async def delete_delivered_deliveries(
    conn: asyncpg.Connection, *, older_than_hours: float, limit: int
) -> list[int]:
    """Delete up to `limit` deliveries delivered more than `older_than_hours` ago; the event id
    of each one deleted."""
    rows = await conn.fetch(DELETE_DELIVERED_SQL, older_than_hours * 3600, limit)
    return [row["event_id"] for row in rows]


async def select_event_window(
    conn: asyncpg.Connection, *, after: int, older_than_hours: float, limit: int
) -> list[asyncpg.Record]:
    """The next `limit` events after id `after`: `id`, `past_retention`, `unused`."""
    return await conn.fetch(  # type: ignore[no-any-return]
        SWEEP_EVENTS_SQL, after, older_than_hours * 3600, limit
    )


async def lock_unused_events(
    conn: asyncpg.Connection, *, event_ids: Sequence[int], older_than_hours: float
) -> list[int]:
    """In the caller's transaction: lock those of `event_ids` past retention that no delivery
    needs, skipping any another transaction holds; their ids."""
    rows = await conn.fetch(LOCK_UNUSED_EVENTS_SQL, list(event_ids), older_than_hours * 3600)
    return [row["id"] for row in rows]


async def delete_unused_events(conn: asyncpg.Connection, *, event_ids: Sequence[int]) -> int:
    """In the caller's transaction, after `lock_unused_events`: delete those of `event_ids` that
    still have no delivery; how many."""
    result = await conn.execute(DELETE_UNUSED_EVENTS_SQL, list(event_ids))
    return int(result.split()[-1])
