-- SQL that more than one statement, or more than one process, needs: kept here once, next to the
-- tables it reads, instead of copied into the code of each caller.

-- A payment's refunds as its documents list them, oldest first ('[]' when there are none):
-- GET /payments/{id} (`refunds`) and GET /payments/{id}/refunds (`data`).
CREATE FUNCTION payment_refunds_json(payment_id bigint) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_agg(refund_json(r) ORDER BY r.refund_id), '[]'::jsonb)
      FROM payment_refunds AS r
     WHERE r.payment_id = payment_refunds_json.payment_id
$$;

-- Deletes up to `batch` idempotency keys past their expiry, oldest first, and returns how many.
-- The relay's housekeeping calls it (in batches, one relay at a time), so the relay does not carry
-- SQL of the API's table. The conditions are repeated outside the sub-select so that a key
-- claimed again meanwhile is re-checked against its new version before it is deleted. The body
-- refers to `batch` as $1 so that the tests can EXPLAIN it as it stands.
CREATE FUNCTION purge_expired_idempotency_keys(batch int) RETURNS int
LANGUAGE sql VOLATILE AS $$
    WITH deleted AS (
        DELETE FROM idempotency_keys
         WHERE key_hash = ANY (ARRAY(SELECT key_hash
                                       FROM idempotency_keys
                                      WHERE expires_at < now()
                                      ORDER BY expires_at
                                      LIMIT $1))
           AND expires_at < now()
        RETURNING 1
    )
    SELECT count(*)::int FROM deleted
$$;
