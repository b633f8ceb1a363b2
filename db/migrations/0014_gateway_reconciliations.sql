-- Scheduled reconciliation (docs/gateway.md, "Reconciliation"): every GATEWAY_RECONCILE_INTERVAL
-- seconds one relay compares our charges and refunds with the gateway's over the window since
-- the previous run (with an overlap) and stores the run here, with the number of differences it
-- found and its whole report. `payment-service reconcile` runs the same comparison by hand and
-- stores nothing.
--
-- Exactly one relay runs a given pass: each takes a session advisory lock before it reads the
-- last run, and runs the pass only when the interval has passed since that run started.
--
-- A new table, and an index on gateway_events for housekeeping, which deletes the webhooks older
-- than GATEWAY_EVENTS_RETENTION_DAYS in short batches, oldest first. Building it locks out the
-- webhook's inserts while it reads the table: that table holds a webhook or two per payment, and
-- a repeated webhook the gateway could not deliver meanwhile is sent again.

SET LOCAL lock_timeout = '5s';

CREATE TABLE gateway_reconciliations (
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
CREATE INDEX gateway_reconciliations_until_idx ON gateway_reconciliations (until DESC);

-- Housekeeping's oldest-first batches of old webhooks.
CREATE INDEX gateway_events_received_idx ON gateway_events (received_at);
