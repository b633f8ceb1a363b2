"""SQL fragments of the statements that change a payment: its outbox event and the idempotency
key's answer.

Every statement that changes a payment's state writes the change, its outbox event with one
delivery per subscribed endpoint, and the answer of the request's idempotency key together: the
API's single statements (app.payments, app.refunds) and the gateway results written by the API
and the gateway worker alike (payment_service.money.charges, .refunds). Fragments are CTEs with
named placeholders (payment_service.sql), composed by name and compiled once at import.
"""

from __future__ import annotations

# The event of each state a payment can be put in by a charge.
EVENT_FOR_STATUS = {
    "SUCCESS": "payment.succeeded",
    "PENDING": "payment.pending",
    "FAILED": "payment.failed",
}
REFUNDED_EVENT = "payment.refunded"
REFUND_FAILED_EVENT = "refund.failed"

# The CTEs `event` and `fan_out`: the outbox event of a payment whose statement changed it, and
# its deliveries. They read the CTE `payment`, whose columns are `p` (the payment's new row) and
# `event_fields` (jsonb added to the payload: a refund's fields, else '{}'), and take the
# placeholder `:event_type`. The payload's `sequence` is the row's `event_sequence`, which every
# statement that changes a payment's state increments in the same UPDATE that this event reads
# back (a new payment recorded at once is inserted with 1; one staged for the gateway with 0, so
# that its first event is 1 too).
# `fan_out` writes one delivery per endpoint subscribed to the event's type, in the
# same statement, so the event and its deliveries commit together. It reads `endpoints` each time
# (no cache): an endpoint added a moment ago gets this event. PAUSED endpoints get theirs and hold
# them until resumed; DISABLED ones get none (`outbox replay --endpoint N --since T` backfills).
PAYMENT_EVENT = """event AS (
        INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)
        SELECT e.event_id, :event_type::text, (payment.p).payment_id,
               payment_event_json(payment.p, e.event_id, :event_type::text)
               || payment.event_fields
          FROM payment
         CROSS JOIN (SELECT gen_random_uuid() AS event_id) AS e
     RETURNING id, event_type, aggregate_id
    ), fan_out AS (
        INSERT INTO deliveries (event_id, endpoint_id, aggregate_id)
        SELECT event.id, endpoint.endpoint_id, event.aggregate_id
          FROM event
          JOIN endpoints AS endpoint
            ON endpoint.state IN ('ACTIVE', 'PAUSED')
           AND endpoint_wants(endpoint.event_types, event.event_type)
         ORDER BY endpoint.endpoint_id
    )"""

# The CTE that stores an operation's answer with its key, the key taken in the same statement.
# It reads the CTE `answer` (columns status, body) and takes the key's placeholders (:key_hash,
# :caller, :request_path, :request_fingerprint, :ttl_seconds).
STORE_ANSWER = """stored AS (
        INSERT INTO idempotency_keys
               (key_hash, caller, request_path, request_fingerprint, response_status,
                response_data, expires_at)
        SELECT :key_hash, :caller, :request_path, :request_fingerprint,
               answer.status, answer.body, now() + make_interval(secs => :ttl_seconds)
          FROM answer
    )"""


# The CTE `answered`: the answer of a key that was taken earlier without one (its operation went
# to the gateway), filled in once. It reads the CTE `source` (columns status, body, and the key:
# key_hash, caller, claimed_at: when the key was taken, the created_at of the payment or refund
# it staged, so that a key taken again after it expired is never answered by an older
# operation). A key answered already keeps its answer: the first answer is the one every retry
# replays.
def answer_key(source: str = "answer") -> str:
    return f"""answered AS (
        UPDATE idempotency_keys AS k
           SET response_status = {source}.status,
               response_data = {source}.body,
               updated_at = now()
          FROM {source}
         WHERE k.key_hash = {source}.key_hash
           AND k.caller = {source}.caller
           AND k.created_at = {source}.claimed_at
           AND k.response_status IS NULL
     RETURNING k.response_status AS status, k.response_data AS body
    )"""


# The key's answer after `answer_key()`, as a query (columns status, body; one row): the answer
# just filled in, else the one stored before, else (the key expired and was purged) `answer`'s.
KEY_ANSWER = """SELECT candidate.status, candidate.body
      FROM (SELECT 1 AS rank, answered.status, answered.body FROM answered
            UNION ALL
            SELECT 2, k.response_status, k.response_data
              FROM idempotency_keys AS k, answer
             WHERE k.key_hash = answer.key_hash
               AND k.caller = answer.caller
               AND k.created_at = answer.claimed_at
               AND k.response_status IS NOT NULL
            UNION ALL
            SELECT 3, answer.status, answer.body FROM answer) AS candidate
     ORDER BY candidate.rank
     LIMIT 1"""
