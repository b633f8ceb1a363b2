-- migrate: no-transaction
-- The console finds a payment's story by the gateway's id of one of its refunds (`re_…`): an
-- index of payment_refunds by gateway_refund_id, for the refunds made at a gateway only (the
-- others have none). The charge's intent has its index already (gateway_operations_charge_intent).
--
-- Safe on a database in use: built CONCURRENTLY (writes go on meanwhile); a run that stops
-- half-way runs again from the top, and the DROP removes what a failed build leaves behind (an
-- INVALID index).

DROP INDEX CONCURRENTLY IF EXISTS payment_refunds_gateway_refund_idx;
CREATE INDEX CONCURRENTLY payment_refunds_gateway_refund_idx
    ON payment_refunds (gateway_refund_id) WHERE gateway_refund_id IS NOT NULL;
