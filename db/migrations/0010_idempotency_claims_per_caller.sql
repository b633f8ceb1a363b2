-- migrate: no-transaction
-- One payment (one refund) per claim of an idempotency key, per caller. Keys are scoped per caller
-- (0003), but the unique indexes that allow one payment or refund per claim of a key stayed on
-- (idempotency_hash, created_at), across callers: two callers sending the same key in
-- transactions that started in the same microsecond (created_at is the transaction's now())
-- collided there, although neither could ever see the other's key. The indexes now include the
-- caller, as the key's own primary key (key_hash, caller) does; rows already stored satisfy them,
-- as the old indexes were stricter.
--
-- Safe on a database in use: each index is built with CREATE UNIQUE INDEX CONCURRENTLY (writes go
-- on meanwhile) before the old one is dropped CONCURRENTLY, so a table is never without one.
-- Each statement commits on its own; a run that stops half-way runs again from the top, and the
-- DROP before each build removes what a failed build leaves behind (an INVALID index).

DROP INDEX CONCURRENTLY IF EXISTS payments_one_per_caller_claim;
CREATE UNIQUE INDEX CONCURRENTLY payments_one_per_caller_claim
    ON payments (idempotency_hash, caller, created_at);

DROP INDEX CONCURRENTLY IF EXISTS payment_refunds_one_per_caller_claim;
CREATE UNIQUE INDEX CONCURRENTLY payment_refunds_one_per_caller_claim
    ON payment_refunds (idempotency_hash, caller, created_at);

DROP INDEX CONCURRENTLY IF EXISTS payments_one_per_idempotency_claim;
DROP INDEX CONCURRENTLY IF EXISTS payment_refunds_one_per_idempotency_claim;
