-- Money moves at a payment gateway, exactly once (docs/gateway.md). A charge or a refund is made
-- in phases, never with a transaction open across a call to the gateway:
--   1. one transaction stages it: the payment PENDING (or the refund PENDING, its amount reserved
--      on the payment), the idempotency key taken but not yet answered, and a gateway operation
--      (phase STARTED) leased by the API process that makes the calls;
--   2. the calls: the intent is created unconfirmed and its id recorded on the operation before
--      it is confirmed (a refund is made with a key derived from the refund's id);
--   3. one transaction writes the result, its outbox event and the key's answer.
-- When the gateway does not decide in time the request answers 202 and the operation waits
-- (phase PENDING) for the gateway's webhook or the relay's gateway worker, which also finishes
-- operations whose lease ran out (the API crashed). An outcome still unknown after
-- GATEWAY_MAX_CHECKS is flagged for review (phase REVIEW), never guessed.
--
-- Upgrading a database in use: every change below is compatible with an API of the previous
-- version as long as it never meets an idempotency key without its answer, which only an API
-- charging at a gateway writes. Upgrade every API and relay with GATEWAY=none first, then switch
-- to GATEWAY=stripe.

SET LOCAL lock_timeout = '5s';

-- A key taken but not answered yet: its operation is being made at the gateway. A request with
-- the same key meanwhile answers 409 IDEMPOTENCY_KEY_IN_PROGRESS. The answer is written whole.
ALTER TABLE idempotency_keys
    ALTER COLUMN response_status DROP NOT NULL,
    ALTER COLUMN response_data DROP NOT NULL,
    ADD CONSTRAINT idempotency_keys_answer_whole
        CHECK ((response_status IS NULL) = (response_data IS NULL));

-- The gateway's verdict on a failed payment (failure_code, failure_message: the gateway's code
-- and text, e.g. card_declined), and the amount of refunds asked of the gateway and not yet
-- decided: reserved under the payment's row lock, so that concurrent refunds never exceed the
-- payment while the gateway decides.
-- The new CHECK is NOT VALID: every existing row satisfies it (reserved_amount is 0, and
-- refunded_amount <= amount is checked already), so no scan of payments runs under the lock; it
-- holds for every row written from now on.
ALTER TABLE payments
    ADD COLUMN failure_code text,
    ADD COLUMN failure_message text,
    ADD COLUMN reserved_amount numeric(12,2) NOT NULL DEFAULT 0,
    ADD CONSTRAINT payments_reserved_within_amount
        CHECK (reserved_amount >= 0 AND refunded_amount + reserved_amount <= amount) NOT VALID;

-- A payment staged for the gateway has no event yet: its first event (payment.pending when the
-- request answered 202, else payment.succeeded or payment.failed) makes it 1. Every existing row
-- has event_sequence >= 1, which the new CHECK allows: NOT VALID for the same reason.
ALTER TABLE payments
    DROP CONSTRAINT payments_event_sequence_check,
    ADD CONSTRAINT payments_event_sequence_check CHECK (event_sequence >= 0) NOT VALID;

-- A refund asked of the gateway is PENDING until the gateway decides: REFUNDED, or FAILED (the
-- gateway refused it; its amount is freed). gateway_refund_id is the gateway's id of it.
ALTER TABLE payment_refunds
    ADD COLUMN gateway_refund_id text,
    ADD COLUMN failure_code text,
    ADD COLUMN failure_message text,
    DROP CONSTRAINT payment_refunds_status_check,
    ADD CONSTRAINT payment_refunds_status_check
        CHECK (status IN ('PENDING', 'REFUNDED', 'FAILED')) NOT VALID;

-- refund.failed: a refund the gateway refused (its amount is refundable again).
ALTER TABLE outbox_events
    DROP CONSTRAINT outbox_events_event_type_check,
    ADD CONSTRAINT outbox_events_event_type_check
        CHECK (event_type IN ('payment.succeeded', 'payment.pending', 'payment.failed',
                              'payment.refunded', 'refund.failed')) NOT VALID;

-- One charge or refund at the gateway, from the transaction that staged it to its result.
CREATE TABLE gateway_operations (
    operation_id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind              text        NOT NULL CHECK (kind IN ('CHARGE', 'REFUND')),
    payment_id        bigint      NOT NULL REFERENCES payments (payment_id),
    refund_id         bigint      REFERENCES payment_refunds (refund_id),
    -- STARTED: staged, its calls in progress (leased by the API, or by a gateway worker once the
    -- API's lease ran out); PENDING: the request answered 202, the gateway has not decided yet
    -- (its webhook or the worker's checks finish it); DONE: the result is written; REVIEW: the
    -- outcome stayed unknown after GATEWAY_MAX_CHECKS checks in a row: an operator decides
    -- (`payment-service gateway review`, POST /admin/payments/{id}/settlement), unless a later
    -- check or webhook learns the outcome first.
    phase             text        NOT NULL DEFAULT 'STARTED'
                      CHECK (phase IN ('STARTED', 'PENDING', 'DONE', 'REVIEW')),
    -- The idempotency key of the request that staged it (its claim is the row's created_at), whose
    -- answer the result writes when the request could not (it answered nothing, or crashed).
    key_hash          char(64)    NOT NULL,
    caller            text        NOT NULL,
    -- CHARGE: what is charged (the gateway's ids), and whether it is the payer's saved method
    -- (charged while the payer is not present).
    payment_method    text,
    customer          text,
    saved_method      boolean     NOT NULL DEFAULT false,
    -- CHARGE: the intent, recorded before it is ever confirmed (an intent whose id was not
    -- recorded is never confirmed: it moved no money). REFUND: the charge's intent.
    intent_id         text,
    gateway_refund_id text,        -- REFUND: the gateway's id of the refund, once known
    outcome           text,        -- DONE: how it ended, for operators
    checks            int         NOT NULL DEFAULT 0 CHECK (checks >= 0),
    -- Consecutive checks that could not learn the outcome (the gateway down, an unreadable
    -- answer): GATEWAY_MAX_CHECKS of them flag the operation for review.
    unknown_checks    int         NOT NULL DEFAULT 0 CHECK (unknown_checks >= 0),
    next_check_at     timestamptz NOT NULL DEFAULT now(),
    -- The lease of whoever makes its calls (the API, then a worker); every write by the holder
    -- checks claim_token, and a call to the gateway is made only under a live lease.
    locked_until      timestamptz,
    claim_token       uuid,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT gateway_operations_refund_kind CHECK ((kind = 'REFUND') = (refund_id IS NOT NULL)),
    CONSTRAINT gateway_operations_refund_intent CHECK (kind = 'CHARGE' OR intent_id IS NOT NULL)
);

CREATE UNIQUE INDEX gateway_operations_one_charge_per_payment
    ON gateway_operations (payment_id) WHERE kind = 'CHARGE';
CREATE UNIQUE INDEX gateway_operations_one_per_refund
    ON gateway_operations (refund_id) WHERE kind = 'REFUND';
-- A webhook finds the payment of an intent through it.
CREATE UNIQUE INDEX gateway_operations_charge_intent
    ON gateway_operations (intent_id) WHERE kind = 'CHARGE';
-- The gateway worker's claim: operations not DONE, due now (one in REVIEW is still asked about,
-- at the longest interval, so that it finishes by itself once the gateway answers).
CREATE INDEX gateway_operations_due_idx
    ON gateway_operations (next_check_at) WHERE phase IN ('STARTED', 'PENDING', 'REVIEW');
-- `gateway review` and its metric.
CREATE INDEX gateway_operations_review_idx
    ON gateway_operations (operation_id) WHERE phase = 'REVIEW';
-- `check`: the open operations of a key.
CREATE INDEX gateway_operations_key_idx ON gateway_operations (key_hash, caller);

ALTER TABLE gateway_operations SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.05
);

-- The gateway's webhooks, each stored once by the gateway's event id (a repeat changes nothing),
-- with what applying it did.
CREATE TABLE gateway_events (
    event_id     text        PRIMARY KEY,
    gateway_type text        NOT NULL,  -- the gateway's own name for it, for operators
    object_id    text,                  -- the intent or refund it was about
    payment_id   bigint,                -- ours, when the object was one of ours
    -- applied | final_already | not_ours | not_final | ignored
    outcome      text        NOT NULL,
    created_at   timestamptz NOT NULL,  -- at the gateway
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX gateway_events_payment_idx ON gateway_events (payment_id) WHERE payment_id IS NOT NULL;

-- The payment document, now with the gateway's failure code and message.
CREATE OR REPLACE FUNCTION payment_json(p payments) RETURNS jsonb
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
        'failure_code',      p.failure_code,
        'failure_message',   p.failure_message,
        'created_at',        p.created_at,
        'updated_at',        p.updated_at
    )
$$;

-- The refund document, now with the gateway's id and its verdict on a failed refund.
CREATE OR REPLACE FUNCTION refund_json(r payment_refunds) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'refund_id',         r.refund_id,
        'payment_id',        r.payment_id,
        'amount',            r.amount,
        'status',            r.status,
        'metadata',          r.metadata,
        'gateway_reference', r.gateway_refund_id,
        'failure_code',      r.failure_code,
        'failure_message',   r.failure_message,
        'created_at',        r.created_at
    )
$$;

-- The answer of POST /payments/{id}/refunds for refund r of payment p (r's status: REFUNDED,
-- PENDING while the gateway decides, FAILED when it refused). remaining_amount is what may still
-- be refunded: neither refunded nor reserved by a refund in progress.
CREATE FUNCTION refund_result_json(r payment_refunds, p payments) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
               'payment_id',       p.payment_id,
               'refund_id',        r.refund_id,
               'refund_amount',    r.amount,
               'currency',         p.currency,
               'status',           r.status,
               'timestamp',        r.created_at,
               'payment_status',   p.status,
               'refunded_amount',  p.refunded_amount,
               'remaining_amount', p.amount - p.refunded_amount - p.reserved_amount
           )
           || CASE r.status
                  WHEN 'FAILED' THEN jsonb_build_object('failure_code', r.failure_code,
                                                        'failure_message', r.failure_message)
                  WHEN 'PENDING' THEN jsonb_build_object('message',
                                                         'Refund accepted for processing')
                  ELSE '{}'::jsonb
              END
$$;
