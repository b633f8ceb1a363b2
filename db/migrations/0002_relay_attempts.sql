-- What the relay records about every delivery attempt, on the event's own row (DESIGN §7): the
-- last answer's status code and time, and a log of every attempt's outcome. Constant defaults
-- make these ADD COLUMNs catalogue-only changes, so they are instant even on a large outbox.
ALTER TABLE outbox_events
    ADD COLUMN last_status_code int CHECK (last_status_code BETWEEN 100 AND 599),
    ADD COLUMN last_attempt_at  timestamptz,
    -- [{"attempt", "at", "outcome", "status_code", "error", "tries", "duration_ms"}, …]
    ADD COLUMN attempt_log      jsonb NOT NULL DEFAULT '[]'::jsonb;
