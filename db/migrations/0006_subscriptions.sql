-- Subscriptions: every downstream service has its own endpoint, and every outbox event one
-- delivery per subscribed endpoint, which carries the delivery state that outbox_events carried
-- (status, attempts, schedule, lease, claim token, last answer, attempt log). An event is what
-- happened; a delivery is sending it to one endpoint.
--
-- Upgrading a database in use: stop the relays first (they read the columns dropped below), then
-- migrate, then start the new relays. Every event becomes a delivery to the endpoint
-- `notification` in the state it had, so nothing undelivered is lost and nothing delivered is
-- sent again. Events that an API instance of the previous version writes after this migration
-- have no delivery: `payment-service check` lists them, and
-- `payment-service outbox replay --endpoint notification --since <the upgrade's start>` sends them.

SET LOCAL lock_timeout = '5s';

CREATE TABLE endpoints (
    endpoint_id     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text        NOT NULL UNIQUE CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    -- NULL: not configured yet. The endpoint `notification` below starts so, until seeding from
    -- NOTIFICATION_SERVICE_URL fills it in; deliveries wait for it meanwhile.
    url             text        CHECK (url ~ '^https?://[^[:space:]]+$'),
    -- Exact types, `payment.*`-style prefixes, or `*` for every type.
    event_types     text[]      NOT NULL DEFAULT '{*}'
                    CHECK (cardinality(event_types) > 0
                           AND array_position(event_types, NULL) IS NULL),
    -- `whsec_` + base64; NULL: callbacks to this endpoint are unsigned.
    secret          text        CHECK (secret LIKE 'whsec\_%'),
    -- After `rotate-secret`, the previous secret stays valid (and signed with) until it expires.
    previous_secret text        CHECK (previous_secret LIKE 'whsec\_%'),
    previous_secret_expires_at timestamptz,
    state           text        NOT NULL DEFAULT 'ACTIVE'
                    CHECK (state IN ('ACTIVE', 'PAUSED', 'DISABLED')),
    state_reason    text,
    state_changed_at timestamptz NOT NULL DEFAULT now(),
    -- Health, shared by every relay (the breaker): consecutive failed attempts; while
    -- breaker_open_until is set the breaker is open, and once it has passed one probe may go
    -- (half-open). The cooldown doubles with each failed probe up to a cap.
    consecutive_failures     int         NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    breaker_open_until       timestamptz,
    breaker_cooldown_seconds float8      NOT NULL DEFAULT 0,
    probe_until              timestamptz,  -- a probe is in flight until then (one relay's lease)
    failing_since            timestamptz,  -- the first failure after the last success
    last_success_at          timestamptz,
    -- True while the endpoint is as seeding from the environment made it; any change by hand
    -- (CLI or admin API) sets it false, and seeding never touches it again.
    seeded          boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Does an endpoint subscribed to `patterns` want an event of type `event_type`? Inlined by the
-- planner into the API's statement (SQL, IMMUTABLE).
CREATE FUNCTION endpoint_wants(patterns text[], event_type text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT event_type = ANY (patterns)
        OR '*' = ANY (patterns)
        OR EXISTS (SELECT 1
                     FROM unnest(patterns) AS p(pattern)
                    WHERE p.pattern LIKE '%.*'
                      AND starts_with(event_type, left(p.pattern, -1)))
$$;

CREATE TABLE deliveries (
    delivery_id     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        bigint      NOT NULL REFERENCES outbox_events (id) ON DELETE CASCADE,
    endpoint_id     bigint      NOT NULL REFERENCES endpoints (endpoint_id) ON DELETE CASCADE,
    aggregate_id    bigint      NOT NULL,  -- the event's payment: order holds per (endpoint, payment)
    status          text        NOT NULL DEFAULT 'PENDING'
                    CHECK (status IN ('PENDING', 'DELIVERED', 'DEAD')),
    attempts        int         NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- Attempts that count toward RELAY_MAX_ATTEMPTS: those made while the endpoint's breaker was
    -- closed. An endpoint that is down makes nothing DEAD.
    counted_attempts int        NOT NULL DEFAULT 0 CHECK (counted_attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,
    claim_token     uuid,
    last_error      text,
    last_status_code int        CHECK (last_status_code BETWEEN 100 AND 599),
    last_attempt_at timestamptz,
    -- [{"attempt", "at", "outcome", "status_code", "error", "tries", "duration_ms"}, …]
    attempt_log     jsonb       NOT NULL DEFAULT '[]'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (event_id, endpoint_id)
);

-- The relay's claim, per endpoint: pending deliveries due now, oldest first.
CREATE INDEX deliveries_due_idx ON deliveries (endpoint_id, next_attempt_at, event_id)
    WHERE status = 'PENDING';
-- Order per (endpoint, payment): "is a delivery of an earlier event of this payment to this
-- endpoint still pending?" By the event's id, not delivery_id: `outbox replay --since` may add a
-- delivery for an older event after a newer one's.
CREATE INDEX deliveries_pending_aggregate_idx ON deliveries (endpoint_id, aggregate_id, event_id)
    WHERE status = 'PENDING';
-- Housekeeping: delivered deliveries past retention.
CREATE INDEX deliveries_delivered_at_idx ON deliveries (delivered_at) WHERE status = 'DELIVERED';
-- `outbox dead`.
CREATE INDEX deliveries_dead_idx ON deliveries (endpoint_id, delivery_id) WHERE status = 'DEAD';

-- A queue, like the outbox: vacuum it often.
ALTER TABLE deliveries SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02
);

-- The single-URL schema's one receiver, configured by seeding (NOTIFICATION_SERVICE_URL).
INSERT INTO endpoints (name, url, event_types, seeded) VALUES ('notification', NULL, '{*}', true);

-- Every event becomes a delivery to `notification`, in the state it had.
INSERT INTO deliveries (event_id, endpoint_id, aggregate_id, status, attempts, counted_attempts,
                        next_attempt_at, locked_until, claim_token, last_error, last_status_code,
                        last_attempt_at, attempt_log, created_at, delivered_at)
SELECT e.id, n.endpoint_id, e.aggregate_id, e.status, e.attempts, e.attempts,
       e.next_attempt_at, e.locked_until, e.claim_token, e.last_error, e.last_status_code,
       e.last_attempt_at, e.attempt_log, e.created_at, e.delivered_at
  FROM outbox_events AS e
 CROSS JOIN (SELECT endpoint_id FROM endpoints WHERE name = 'notification') AS n
 ORDER BY e.id;

-- The delivery state now lives on deliveries.
DROP INDEX outbox_events_due_idx;
DROP INDEX outbox_events_pending_aggregate_idx;
DROP INDEX outbox_events_delivered_at_idx;
DROP INDEX outbox_events_dead_idx;
ALTER TABLE outbox_events
    DROP COLUMN status,
    DROP COLUMN attempts,
    DROP COLUMN next_attempt_at,
    DROP COLUMN locked_until,
    DROP COLUMN claim_token,
    DROP COLUMN last_error,
    DROP COLUMN delivered_at,
    DROP COLUMN last_status_code,
    DROP COLUMN last_attempt_at,
    DROP COLUMN attempt_log;
-- Housekeeping deletes an event once every delivery of it is delivered and past retention.
CREATE INDEX outbox_events_created_at_idx ON outbox_events (created_at);
