-- Idempotency keys are scoped per caller (DESIGN §5): two callers that send the same key never
-- replay, see or block each other's requests. The caller is the name of the API_KEYS entry whose
-- token the request carried (`name:token`; a bare token is named 'default'); with auth off every
-- request is the one caller 'default'. key_hash stays the hex SHA-256 of the key as sent, so the
-- guide's `WHERE key_hash = encode(digest('demo-client-1','sha256'),'hex')` still finds the row
-- (one per caller that used the key).
--
-- Existing rows become the caller 'default': that is the scope today's settings map to (auth
-- off, or bare tokens), so a client that retries across the upgrade still gets its replay instead
-- of a second charge. The column default stays 'default' for the same reason during a rolling
-- upgrade: an API instance of the previous version, which does not know callers, keeps writing
-- into the scope that the new version gives those requests (and takes the same advisory lock).
--
-- Safe on a database in use:
-- - ADD COLUMN with a constant default is a catalogue-only change (PostgreSQL ≥ 11): existing rows
--   read as 'default' without a table rewrite, on payments and payment_refunds of any size.
-- - The one index built is the new primary key of idempotency_keys, a table the TTL keeps small.
--   payments and payment_refunds keep their unique indexes on (idempotency_hash, created_at): one
--   row per claim of a key, which is stricter than one per caller's claim and needs no rebuild
--   (two callers' claims in the same microsecond collide there and the API decides again).
-- - It takes all its locks up front, in one statement, and waits at most lock_timeout for them:
--   behind a long transaction it fails (rolled back whole; run it again) instead of queueing every
--   request of the API behind its pending ACCESS EXCLUSIVE locks. Once it has them it holds them
--   only for the catalogue changes and the primary key's build.
SET LOCAL lock_timeout = '5s';
LOCK TABLE payments, payment_refunds, idempotency_keys IN ACCESS EXCLUSIVE MODE;

ALTER TABLE idempotency_keys ADD COLUMN caller text NOT NULL DEFAULT 'default';
ALTER TABLE payments ADD COLUMN caller text NOT NULL DEFAULT 'default';
ALTER TABLE payment_refunds ADD COLUMN caller text NOT NULL DEFAULT 'default';

-- key_hash first: the guide's query by key_hash (and the housekeeping delete) still use the index.
ALTER TABLE idempotency_keys
    DROP CONSTRAINT idempotency_keys_pkey,
    ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (key_hash, caller);
