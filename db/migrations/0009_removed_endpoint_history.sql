-- Removing an endpoint keeps its delivery history. Until now `endpoints remove` cascaded to every
-- delivery of the endpoint, delivered ones included, so what a removed receiver had been sent was
-- lost at once. Now its undelivered deliveries (PENDING, DEAD) are deleted with it, and its
-- delivered ones stay, with `endpoint_id` NULL and the endpoint's name in `removed_endpoint`,
-- until housekeeping deletes them with the rest (OUTBOX_RETENTION_HOURS).
--
-- No relay or API reads a delivery without an endpoint: claims, order and health go by
-- endpoint_id, and a removed endpoint's kept rows are all DELIVERED.

SET LOCAL lock_timeout = '5s';

ALTER TABLE deliveries ADD COLUMN removed_endpoint text;
ALTER TABLE deliveries ALTER COLUMN endpoint_id DROP NOT NULL;

-- No cascade any more: payment_service.endpoints.delete_endpoint detaches what it keeps and
-- deletes the rest first, so a DELETE of an endpoint that still has deliveries is an error
-- rather than a silent loss of history.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_endpoint_id_fkey;
-- NOT VALID: every existing row references an endpoint (the previous key said so), and skipping
-- the check keeps the migration instant on a large table. New and changed rows are checked.
ALTER TABLE deliveries
    ADD CONSTRAINT deliveries_endpoint_id_fkey
    FOREIGN KEY (endpoint_id) REFERENCES endpoints (endpoint_id) NOT VALID;

-- A delivery belongs to an endpoint, or is the delivered history of a removed one.
ALTER TABLE deliveries
    ADD CONSTRAINT deliveries_endpoint_or_history CHECK (
        CASE WHEN endpoint_id IS NULL
             THEN removed_endpoint IS NOT NULL AND status = 'DELIVERED'
             ELSE removed_endpoint IS NULL
        END
    ) NOT VALID;
