-- `sequence` in every callback body (DESIGN §7): the count of the payment's state changes, so a
-- receiver can drop an event older than the state it already holds (after a replay, say).
--
-- The counter lives on the payment row and every statement that changes the payment's state
-- increments it in the same UPDATE that writes its outbox event. Refunds lock the payment row, and
-- an UPDATE re-reads a row another transaction changed, so concurrent refunds get distinct,
-- gap-free numbers. A new payment is its own first state change: the default is 1.
ALTER TABLE payments ADD COLUMN event_sequence int NOT NULL DEFAULT 1 CHECK (event_sequence >= 1);

-- Existing payments: as many state changes as they have events, but never fewer than the changes
-- still visible in their rows (housekeeping may have deleted old delivered events): the charge,
-- a settlement to FAILED, and each refund.
UPDATE payments AS p
   SET event_sequence = counted.changes
  FROM (
      SELECT q.payment_id,
             greatest(coalesce(e.events, 0),
                      1 + (q.status = 'FAILED')::int + coalesce(r.refunds, 0)) AS changes
        FROM payments AS q
        LEFT JOIN (SELECT aggregate_id, count(*) AS events
                     FROM outbox_events GROUP BY aggregate_id) AS e
               ON e.aggregate_id = q.payment_id
        LEFT JOIN (SELECT payment_id, count(*) AS refunds
                     FROM payment_refunds GROUP BY payment_id) AS r
               ON r.payment_id = q.payment_id
  ) AS counted
 WHERE counted.payment_id = p.payment_id
   AND counted.changes <> p.event_sequence;

-- Events already written get their number too, counting back from the payment's counter in the
-- order they were written, so a pending or dead event sent after the upgrade carries it.
UPDATE outbox_events AS o
   SET payload = o.payload || jsonb_build_object('sequence', numbered.sequence)
  FROM (
      SELECT e.id,
             p.event_sequence
             - (count(*) OVER (PARTITION BY e.aggregate_id)
                - row_number() OVER (PARTITION BY e.aggregate_id ORDER BY e.id)) AS sequence
        FROM outbox_events AS e
        JOIN payments AS p ON p.payment_id = e.aggregate_id
  ) AS numbered
 WHERE numbered.id = o.id
   AND NOT o.payload ? 'sequence';

-- The callback body of DESIGN §7 for an event about payment p (refund fields added by the caller),
-- now with the payment's state-change count.
CREATE OR REPLACE FUNCTION payment_event_json(p payments, event_id uuid, event_type text)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'event_id',    event_id,
        'event_type',  event_type,
        'occurred_at', p.updated_at,
        'payment_id',  p.payment_id,
        'trip_id',     p.trip_id,
        'amount',      p.amount,
        'currency',    p.currency,
        'status',      p.status,
        'reference',   p.reference,
        'sequence',    p.event_sequence
    )
$$;
