-- migrate: no-transaction
-- Scheduled reconciliation (docs/gateway.md, "Reconciliation"): every GATEWAY_RECONCILE_INTERVAL
-- seconds one relay compares our charges and refunds with the gateway's over the window since
-- the previous run (with an overlap) and stores the run here, with the number of differences it
-- found and its whole report. `payment-service reconcile` runs the same comparison by hand and
-- stores nothing.
--
-- Exactly one relay runs a given pass: each takes a session advisory lock before it reads the
-- last run, and runs the pass only when the interval has passed since that run started.
--
-- A new table, and indexes on tables that may be big, built CONCURRENTLY (writes go on
-- meanwhile): this file runs outside a transaction, one statement at a time, and runs again from
-- the top if it stops half-way, so every statement is idempotent; the DROPs remove what a failed
-- build leaves behind (an INVALID index).

CREATE TABLE IF NOT EXISTS gateway_reconciliations (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    since       timestamptz NOT NULL,
    until       timestamptz NOT NULL,
    differences int         NOT NULL CHECK (differences >= 0),
    report      jsonb       NOT NULL CHECK (jsonb_typeof(report) = 'object'),
    CONSTRAINT gateway_reconciliations_window CHECK (since < until),
    CONSTRAINT gateway_reconciliations_times CHECK (started_at <= finished_at)
);

-- The last run (the next window starts from its `until`; the console shows it).
CREATE INDEX IF NOT EXISTS gateway_reconciliations_until_idx
    ON gateway_reconciliations (until DESC);

-- Housekeeping's oldest-first batches of old webhooks (deleted after
-- GATEWAY_EVENTS_RETENTION_DAYS).
DROP INDEX CONCURRENTLY IF EXISTS gateway_events_received_idx;
CREATE INDEX CONCURRENTLY gateway_events_received_idx ON gateway_events (received_at);

-- Reconciliation: the charges and refunds staged in a window...
DROP INDEX CONCURRENTLY IF EXISTS gateway_operations_created_idx;
CREATE INDEX CONCURRENTLY gateway_operations_created_idx ON gateway_operations (created_at);

-- ...and, in a scheduled run, those decided since the window's start, whichever window they were
-- staged in: a payment still PENDING at one run and decided hours later (the review queue) is
-- compared at the next. (An operation's updated_at changes when it is decided, and rarely after.)
DROP INDEX CONCURRENTLY IF EXISTS gateway_operations_decided_idx;
CREATE INDEX CONCURRENTLY gateway_operations_decided_idx
    ON gateway_operations (updated_at) WHERE phase = 'DONE';
