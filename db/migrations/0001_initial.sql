-- The Payment Service schema: payments, refunds, idempotency records and the transactional outbox.
-- Money is numeric(12,2); times are timestamptz. The API writes all four tables in one transaction
-- and the relay reads outbox_events; this file is the contract between the two.

-- The seed guide's `encode(digest(key, 'sha256'), 'hex')` needs digest(). pgcrypto provides it where
-- installed; elsewhere (the embedded server ships without contrib) a compatible SQL function does.
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pgcrypto;
EXCEPTION WHEN OTHERS THEN
    CREATE OR REPLACE FUNCTION digest(data text, algorithm text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
        SELECT CASE lower(algorithm)
                   WHEN 'sha256' THEN sha256(convert_to(data, 'UTF8'))
                   WHEN 'sha512' THEN sha512(convert_to(data, 'UTF8'))
                   WHEN 'md5'    THEN decode(md5(convert_to(data, 'UTF8')), 'hex')
               END
    $fn$;
END
$$;

CREATE TABLE payments (
    payment_id        bigserial     PRIMARY KEY,
    trip_id           bigint        NOT NULL CHECK (trip_id >= 1),
    amount            numeric(12,2) NOT NULL CHECK (amount > 0),
    currency          char(3)       NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    method            varchar(16)   NOT NULL
                      CHECK (method IN ('CARD', 'UPI', 'WALLET', 'CASH', 'NETBANKING')),
    status            varchar(24)   NOT NULL
                      CHECK (status IN ('PENDING', 'SUCCESS', 'FAILED',
                                        'PARTIALLY_REFUNDED', 'REFUNDED')),
    reference         varchar(32)   NOT NULL UNIQUE,
    idempotency_hash  char(64)      NOT NULL,
    refunded_amount   numeric(12,2) NOT NULL DEFAULT 0,
    metadata          jsonb         NOT NULL DEFAULT '{}'::jsonb,
    gateway_reference text,
    failure_reason    text,
    created_at        timestamptz   NOT NULL DEFAULT now(),
    updated_at        timestamptz   NOT NULL DEFAULT now(),
    CONSTRAINT payments_refund_within_amount CHECK (refunded_amount >= 0 AND refunded_amount <= amount),
    CONSTRAINT payments_refund_status CHECK (
        (status = 'REFUNDED') = (refunded_amount = amount)
        AND (status = 'PARTIALLY_REFUNDED') = (refunded_amount > 0 AND refunded_amount < amount)
    )
);

-- At most one live charge per trip: a FAILED payment frees the trip for another attempt.
CREATE UNIQUE INDEX payments_one_live_charge_per_trip ON payments (trip_id) WHERE status <> 'FAILED';
-- Exactly one payment per claim of an idempotency key (a key may be claimed again once expired;
-- the claim and the payment share the transaction's now()).
CREATE UNIQUE INDEX payments_one_per_idempotency_claim ON payments (idempotency_hash, created_at);
-- GET /payments?trip_id=… and ?status=…, newest first with keyset pagination.
CREATE INDEX payments_trip_id_idx ON payments (trip_id, payment_id DESC);
CREATE INDEX payments_status_idx ON payments (status, payment_id DESC);

CREATE TABLE payment_refunds (
    refund_id        bigserial     PRIMARY KEY,
    payment_id       bigint        NOT NULL REFERENCES payments (payment_id),
    amount           numeric(12,2) NOT NULL CHECK (amount > 0),
    status           varchar(16)   NOT NULL DEFAULT 'REFUNDED' CHECK (status IN ('REFUNDED', 'FAILED')),
    idempotency_hash char(64)      NOT NULL,
    metadata         jsonb         NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz   NOT NULL DEFAULT now()
);

CREATE INDEX payment_refunds_payment_id_idx ON payment_refunds (payment_id, refund_id);
CREATE UNIQUE INDEX payment_refunds_one_per_idempotency_claim
    ON payment_refunds (idempotency_hash, created_at);

-- One row per idempotency key (hex SHA-256 of the key as sent). The response is stored in the same
-- transaction as the operation, so a row always carries its final answer: response_data is the
-- body as jsonb, and its text form is what the first answer and every replay send, byte for byte.
CREATE TABLE idempotency_keys (
    key_hash            char(64)    PRIMARY KEY,
    request_path        text        NOT NULL,
    request_fingerprint char(64)    NOT NULL,
    response_status     int         NOT NULL CHECK (response_status BETWEEN 100 AND 599),
    response_data       jsonb       NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL
);

CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);

-- The transactional outbox. payload is the callback body; the relay leases rows (locked_until,
-- claim_token), records every attempt on the row, and marks them DELIVERED or DEAD.
CREATE TABLE outbox_events (
    id              bigserial   PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    event_type      varchar(32) NOT NULL
                    CHECK (event_type IN ('payment.succeeded', 'payment.pending',
                                          'payment.failed', 'payment.refunded')),
    aggregate_id    bigint      NOT NULL REFERENCES payments (payment_id),
    payload         jsonb       NOT NULL,
    status          varchar(16) NOT NULL DEFAULT 'PENDING'
                    CHECK (status IN ('PENDING', 'DELIVERED', 'DEAD')),
    attempts        int         NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz,
    claim_token     uuid,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);

-- The relay's claim: pending rows due now, oldest first.
CREATE INDEX outbox_events_due_idx ON outbox_events (next_attempt_at, id) WHERE status = 'PENDING';
-- Per-payment ordering: "is an earlier event of this payment still pending?"
CREATE INDEX outbox_events_pending_aggregate_idx ON outbox_events (aggregate_id, id)
    WHERE status = 'PENDING';
-- Every event of a payment (consistency checks, GET-side joins).
CREATE INDEX outbox_events_aggregate_idx ON outbox_events (aggregate_id);
-- Housekeeping: delivered rows past retention.
CREATE INDEX outbox_events_delivered_at_idx ON outbox_events (delivered_at) WHERE status = 'DELIVERED';
-- `outbox dead`.
CREATE INDEX outbox_events_dead_idx ON outbox_events (id) WHERE status = 'DEAD';

-- The outbox is a queue: vacuum it often so dead tuples do not pile up between relay scans.
ALTER TABLE outbox_events SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02
);

-- The JSON document of a payment, as every endpoint answers it. Built here so that the first
-- answer and its idempotent replays are the same jsonb, and the hot path never re-encodes JSON.
CREATE FUNCTION payment_json(p payments) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'payment_id',        p.payment_id,
        'trip_id',           p.trip_id,
        'amount',            p.amount,
        'currency',          p.currency,
        'method',            p.method,
        'status',            p.status,
        'reference',         p.reference,
        'refunded_amount',   p.refunded_amount,
        'metadata',          p.metadata,
        'gateway_reference', p.gateway_reference,
        'failure_reason',    p.failure_reason,
        'created_at',        p.created_at,
        'updated_at',        p.updated_at
    )
$$;

-- The callback body of DESIGN §7 for an event about payment p (refund fields added by the caller).
CREATE FUNCTION payment_event_json(p payments, event_id uuid, event_type text) RETURNS jsonb
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
        'reference',   p.reference
    )
$$;

-- The JSON document of a refund, as GET /payments/{id} and /payments/{id}/refunds answer it.
CREATE FUNCTION refund_json(r payment_refunds) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'refund_id',  r.refund_id,
        'payment_id', r.payment_id,
        'amount',     r.amount,
        'status',     r.status,
        'metadata',   r.metadata,
        'created_at', r.created_at
    )
$$;
