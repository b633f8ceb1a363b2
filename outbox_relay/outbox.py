"""The relay's SQL on `outbox_events`.

Every function takes the connection first and runs one short statement: no transaction is ever
held open while a callback is in flight. A claim leases rows with a token; every later write to a
claimed row checks that token, so a relay whose lease ran out cannot overwrite a newer claim.
The statements are module constants so that the tests can EXPLAIN exactly what runs; each is
whole, its `$n` numbered in place. The API's tables are not read here: housekeeping purges expired
idempotency keys through the schema's `purge_expired_idempotency_keys` (db/migrations/0005).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

# pg_advisory_lock key of housekeeping, one relay at a time ("outboxhk" in ASCII).
HOUSEKEEPING_LOCK_ID = 0x6F7574626F78686B

ERROR_TEXT_LIMIT = 300  # characters of an error kept on the row and in its attempt log
MIN_STATUS_CODE, MAX_STATUS_CODE = 100, 599  # what the CHECK on last_status_code allows
# Characters PostgreSQL text and jsonb reject (NUL), or UTF-8 cannot encode (lone surrogates).
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")

CLAIM_SQL = """
WITH due AS (
    SELECT e.id
      FROM outbox_events AS e
     WHERE e.status = 'PENDING'
       AND e.next_attempt_at <= now()
       -- not leased, or the lease of a relay that died has run out
       AND (e.locked_until IS NULL OR e.locked_until < now())
       -- order per payment: only a payment's earliest undelivered event may go;
       -- a DEAD event no longer blocks the ones after it
       AND NOT EXISTS (SELECT 1
                         FROM outbox_events AS earlier
                        WHERE earlier.aggregate_id = e.aggregate_id
                          AND earlier.status = 'PENDING'
                          AND earlier.id < e.id)
     ORDER BY e.next_attempt_at, e.id
     LIMIT $1
       FOR UPDATE SKIP LOCKED
)
UPDATE outbox_events AS o
   SET locked_until = now() + make_interval(secs => $2),
       claim_token = $3
  FROM due
 WHERE o.id = due.id
RETURNING o.id, o.event_id::text, o.aggregate_id, o.payload, o.attempts,
          extract(epoch FROM o.created_at)::float8 AS created_at
"""

RECORD_SQL = """
WITH attempt AS (
    SELECT *
      FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::float8[], $5::float8[], $6::int[],
                  $7::text[], $8::int[], $9::int[])
           AS a(id, claim_token, status, delay, attempted_at, status_code, error, tries,
                duration_ms)
), written AS (
    UPDATE outbox_events AS o
       SET status = a.status,
           attempts = o.attempts + 1,
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
     WHERE o.id = a.id
       AND o.claim_token = a.claim_token
 RETURNING o.id, o.aggregate_id
)
-- `unblocks`: a later event of the same payment was waiting for this one
SELECT w.id,
       EXISTS (SELECT 1
                 FROM outbox_events AS later
                WHERE later.aggregate_id = w.aggregate_id
                  AND later.status = 'PENDING'
                  AND later.id > w.id) AS unblocks
  FROM written AS w
"""

RELEASE_SQL = """
UPDATE outbox_events AS o
   SET locked_until = NULL,
       claim_token = NULL
  FROM unnest($1::bigint[], $2::uuid[]) AS c(id, claim_token)
 WHERE o.id = c.id
   AND o.claim_token = c.claim_token
"""

# The undelivered part of the outbox, counted once for the relay's gauges (every few seconds),
# `outbox stats` and `payment-service check`: PENDING rows by state and DEAD rows, both read
# through their partial indexes, so the cost follows the backlog, not the retained history.
BACKLOG_SQL = """
SELECT count(*) AS pending,
       count(*) FILTER (WHERE locked_until > now()) AS in_flight,
       count(*) FILTER (WHERE next_attempt_at <= now()
                          AND (locked_until IS NULL OR locked_until <= now())) AS due,
       count(*) FILTER (WHERE attempts > 0) AS retrying,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest_pending_age_seconds,
       (SELECT count(*) FROM outbox_events WHERE status = 'DEAD') AS dead
  FROM outbox_events
 WHERE status = 'PENDING'
"""

# The conditions are repeated outside the sub-select so that a row changed meanwhile (a key
# claimed again, say) is re-checked against its new version before it is deleted.
DELETE_DELIVERED_SQL = """
DELETE FROM outbox_events
 WHERE id = ANY (ARRAY(SELECT id
                         FROM outbox_events
                        WHERE status = 'DELIVERED'
                          AND delivered_at < now() - make_interval(secs => $1)
                        ORDER BY delivered_at
                        LIMIT $2))
   AND status = 'DELIVERED'
   AND delivered_at < now() - make_interval(secs => $1)
"""


@dataclass(slots=True)
class ClaimedEvent:
    id: int
    event_id: str
    aggregate_id: int
    body: bytes  # the payload jsonb as text, sent byte for byte
    attempts: int  # attempts made before this claim
    created_at: float  # epoch seconds
    claim_token: uuid.UUID


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


def safe_text(text: str | None, *, limit: int = ERROR_TEXT_LIMIT) -> str | None:
    """`text` cut to `limit` characters, as PostgreSQL text and jsonb take it: no NUL, no lone
    surrogate (each becomes a replacement character); None stays None."""
    if text is None:
        return None
    return _UNSTORABLE.sub("\ufffd", text[:limit])


def safe_status_code(code: int | None) -> int | None:
    """An HTTP status code the row can hold: None for one outside 100-599."""
    return code if code is not None and MIN_STATUS_CODE <= code <= MAX_STATUS_CODE else None


async def claim_events(
    conn: asyncpg.Connection, *, limit: int, lease_seconds: float
) -> list[ClaimedEvent]:
    """Lease up to `limit` events that are due, oldest first, one per payment at most."""
    token = uuid.uuid4()
    rows = await conn.fetch(CLAIM_SQL, limit, lease_seconds, token)
    return [ClaimedEvent(r[0], r[1], r[2], r[3].encode(), r[4], r[5], token) for r in rows]


async def record_attempts(
    conn: asyncpg.Connection, records: Sequence[AttemptRecord]
) -> list[tuple[int, bool]]:
    """Write a batch of finished attempts in one statement and end their leases.

    Rows whose claim token changed (the lease ran out and another relay took the event) are left
    alone. Returns `(id, unblocks)` for each row written. Whatever a receiver answered, the status
    code and error are made safe to store here (see `safe_text`, `safe_status_code`).
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
    )
    return [(row[0], row[1]) for row in rows]


async def release_claims(conn: asyncpg.Connection, claims: Sequence[tuple[int, uuid.UUID]]) -> int:
    """End leases without an attempt (shutdown): the events are due again at once."""
    result = await conn.execute(
        RELEASE_SQL, [claim[0] for claim in claims], [claim[1] for claim in claims]
    )
    return int(result.split()[-1])


# -- inspection and operation -------------------------------------------------------------------
async def select_backlog(conn: asyncpg.Connection) -> asyncpg.Record:
    """Pending events (all, in flight, due, retrying), the oldest one's age in seconds (None if
    none) and dead events: see BACKLOG_SQL."""
    row = await conn.fetchrow(BACKLOG_SQL)
    assert row is not None
    return row


# -- housekeeping -------------------------------------------------------------------------------
async def delete_delivered_events(
    conn: asyncpg.Connection, *, older_than_hours: float, limit: int
) -> int:
    """Delete up to `limit` events delivered more than `older_than_hours` ago."""
    result = await conn.execute(DELETE_DELIVERED_SQL, older_than_hours * 3600, limit)
    return int(result.split()[-1])
