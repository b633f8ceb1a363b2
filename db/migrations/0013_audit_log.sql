-- The audit log: every operator action (an endpoint added, changed, paused, its secret rotated,
-- deliveries replayed, a payment settled by hand, …) from the command line, the admin API or the
-- console, one row written in the same transaction as the change it records. Who (`actor`: the
-- admin key's name as `admin:<name>` or `console:<name>`, the operating-system user as
-- `cli:<user>`), what (`action`, e.g. `endpoint.pause`), on what (`target_kind` + `target_id`),
-- when (`at`, the database's clock), from where (`origin`: the client's address, or `cli@<host>`),
-- the fields that changed (`before`, `after`; never a secret) and the operator's reason.
--
-- Append-only, and kept forever: the service never updates or deletes a row (the triggers below
-- refuse it, whoever asks) and housekeeping leaves the table alone. It grows by operator actions
-- only: a few rows a day.

SET LOCAL lock_timeout = '5s';

CREATE TABLE audit_log (
    audit_id    bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL CHECK (actor ~ '^[a-z]+:.+$' AND length(actor) <= 200),
    action      text        NOT NULL CHECK (action ~ '^[a-z]+(\.[a-z_]+)+$'),
    target_kind text        NOT NULL CHECK (target_kind ~ '^[a-z_]+$'),
    target_id   text        NOT NULL CHECK (length(target_id) BETWEEN 1 AND 200),
    origin      text        NOT NULL CHECK (length(origin) <= 300),
    reason      text        CHECK (length(reason) <= 1000),
    before      jsonb       CHECK (jsonb_typeof(before) = 'object'),
    after       jsonb       CHECK (jsonb_typeof(after) = 'object')
);

-- The log is read newest first, by time, in keyset pages of (at, audit_id); filtered by actor,
-- action or target, each with its own index in that order.
CREATE INDEX audit_log_at_idx ON audit_log (at, audit_id);
CREATE INDEX audit_log_actor_idx ON audit_log (actor, at, audit_id);
CREATE INDEX audit_log_action_idx ON audit_log (action, at, audit_id);
CREATE INDEX audit_log_target_idx ON audit_log (target_id, at, audit_id);

CREATE FUNCTION audit_log_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'it keeps every operator action for good';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
