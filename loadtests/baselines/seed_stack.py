"""The seed guide's own stack, for side-by-side benchmarks: Flask + psycopg2 on gunicorn.

A reference implementation of `POST /payments` (and `GET /health`) written the way a competent
team following the seed guide would write it, against the SAME schema (db/migrations) and with the
same transaction as the Payment Service:

    one transaction: take the idempotency key (transaction-scoped advisory lock; a concurrent
    request with the key gets 409 at once), replay a stored response if the key is known, else
    insert the payment, its outbox event (the callback body) and the idempotency record with the
    stored response; commit; answer.

It is benchmark-only code (`make bench` runs it), not part of the service. It is given every fair
advantage: a per-worker connection pool, no ORM, prepared-statement-free plain SQL, hand-written
validation, no logging on the hot path. Run it with, for example:

    DATABASE_URL=postgresql://... gunicorn -w 5 -b 127.0.0.1:8090 \
        --chdir loadtests/baselines 'seed_stack:create_app()'
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras
import psycopg2.pool
from flask import Flask, Response, g, request

METHODS = frozenset({"CARD", "UPI", "WALLET", "CASH", "NETBANKING"})
TTL_SECONDS = int(os.environ.get("IDEMPOTENCY_KEY_TTL", "86400"))
POOL_MAX = int(os.environ.get("DB_POOL_MAX", "10"))
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_CENT = Decimal("0.01")


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _json(status: int, body: Any, **headers: str) -> Response:
    return Response(json.dumps(body, default=str), status, headers, mimetype="application/json")


def _parse(body: Any) -> dict[str, Any]:
    """Validate the request the way the seed does: required fields, types, ranges."""
    if not isinstance(body, dict):
        raise ApiError(400, "VALIDATION_ERROR", "body must be a JSON object")
    key = body.get("idempotency_key") or request.headers.get("Idempotency-Key")
    if not isinstance(key, str) or not 1 <= len(key) <= 255:
        raise ApiError(400, "IDEMPOTENCY_KEY_MISSING", "idempotency_key is required")
    trip_id = body.get("trip_id")
    if not isinstance(trip_id, int) or isinstance(trip_id, bool) or not 1 <= trip_id < 2**63:
        raise ApiError(400, "VALIDATION_ERROR", "trip_id must be a positive integer")
    method = body.get("method")
    if method not in METHODS:
        raise ApiError(400, "VALIDATION_ERROR", "unknown payment method")
    try:
        amount = Decimal(str(body.get("amount")))
    except InvalidOperation:
        raise ApiError(400, "VALIDATION_ERROR", "amount must be a number") from None
    if not amount.is_finite() or amount <= 0 or amount != amount.quantize(_CENT):
        raise ApiError(400, "VALIDATION_ERROR", "amount must be positive with 2 decimals")
    currency = body.get("currency", "INR")
    if not isinstance(currency, str) or not _CURRENCY.match(currency):
        raise ApiError(400, "VALIDATION_ERROR", "currency must be ISO 4217")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ApiError(400, "VALIDATION_ERROR", "metadata must be an object")
    return {
        "key": key,
        "trip_id": trip_id,
        "method": method,
        "amount": amount.quantize(_CENT),
        "currency": currency,
        "metadata": metadata,
    }


def _fingerprint(req: dict[str, Any]) -> str:
    canonical = json.dumps(
        {
            "method": "POST",
            "route": "/payments",
            "trip_id": req["trip_id"],
            "payment_method": req["method"],
            "amount": str(req["amount"]),
            "currency": req["currency"],
            "metadata": req["metadata"],
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_payment(conn: Any, req: dict[str, Any]) -> tuple[int, Any]:
    """The whole operation in one transaction; returns (status, body)."""
    key_hash = hashlib.sha256(req["key"].encode()).hexdigest()
    fingerprint = _fingerprint(req)
    with conn, conn.cursor() as cur:  # commits on success, rolls back on error
        cur.execute("SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))", (key_hash,))
        if not cur.fetchone()[0]:
            raise ApiError(409, "IDEMPOTENCY_KEY_IN_PROGRESS", "request with this key in progress")
        cur.execute(
            "SELECT request_fingerprint, response_status, response_data::text"
            "  FROM idempotency_keys WHERE key_hash = %s AND caller = 'default'"
            " AND expires_at > now()",
            (key_hash,),
        )
        stored = cur.fetchone()
        if stored is not None:
            if stored[0] != fingerprint:
                raise ApiError(422, "IDEMPOTENCY_KEY_REUSED", "key used for another request")
            return stored[1], json.loads(stored[2])

        reference = f"PAY-{dt.datetime.now(dt.UTC):%Y%m%d}-{secrets.token_hex(4)}"
        try:
            cur.execute(
                "INSERT INTO payments (trip_id, amount, currency, method, status, reference,"
                "                      idempotency_hash, metadata)"
                " VALUES (%s, %s, %s, %s, 'SUCCESS', %s, %s, %s)"
                " RETURNING payment_id, created_at, updated_at",
                (
                    req["trip_id"],
                    req["amount"],
                    req["currency"],
                    req["method"],
                    reference,
                    key_hash,
                    psycopg2.extras.Json(req["metadata"]),
                ),
            )
        except psycopg2.errors.UniqueViolation:
            raise ApiError(409, "TRIP_ALREADY_CHARGED", "trip already charged") from None
        payment_id, created_at, updated_at = cur.fetchone()
        payment = {
            "payment_id": payment_id,
            "trip_id": req["trip_id"],
            "amount": str(req["amount"]),
            "currency": req["currency"],
            "method": req["method"],
            "status": "SUCCESS",
            "reference": reference,
            "refunded_amount": "0.00",
            "metadata": req["metadata"],
            "created_at": created_at.isoformat(),
            "updated_at": updated_at.isoformat(),
        }
        event_id = secrets.token_hex(16)
        event = {
            "event_id": event_id,
            "event_type": "payment.succeeded",
            "occurred_at": payment["updated_at"],
            "payment_id": payment_id,
            "trip_id": req["trip_id"],
            "amount": payment["amount"],
            "currency": req["currency"],
            "status": "SUCCESS",
            "reference": reference,
        }
        cur.execute(
            "INSERT INTO outbox_events (event_id, event_type, aggregate_id, payload)"
            " VALUES (%s, 'payment.succeeded', %s, %s)",
            (event_id, payment_id, psycopg2.extras.Json(event)),
        )
        cur.execute(
            "INSERT INTO idempotency_keys (key_hash, request_path, request_fingerprint,"
            "                              response_status, response_data, expires_at)"
            " VALUES (%s, 'POST:/payments', %s, 200, %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (key_hash, caller) DO UPDATE"
            " SET request_fingerprint = EXCLUDED.request_fingerprint,"
            "     response_status = 200, response_data = EXCLUDED.response_data,"
            "   created_at = now(), updated_at = now(), expires_at = EXCLUDED.expires_at",
            (key_hash, fingerprint, psycopg2.extras.Json(payment), TTL_SECONDS),
        )
    return 200, payment


def create_app() -> Flask:
    app = Flask(__name__)
    pool = psycopg2.pool.ThreadedConnectionPool(1, POOL_MAX, dsn=os.environ["DATABASE_URL"])

    @app.before_request
    def _take_connection() -> None:
        g.conn = None

    @app.teardown_request
    def _give_back(_: BaseException | None) -> None:
        conn = g.pop("conn", None)
        if conn is not None:
            pool.putconn(conn)

    @app.errorhandler(ApiError)
    def _problem(error: ApiError) -> Response:
        body = {
            "title": error.code,
            "status": error.status,
            "detail": error.detail,
            "code": error.code,
        }
        return _json(error.status, body)

    @app.get("/health")
    def health() -> Response:
        g.conn = pool.getconn()
        with g.conn, g.conn.cursor() as cur:
            cur.execute("SELECT 1")
        return _json(200, {"status": "healthy", "service": "payment-service", "version": "1.0.0"})

    @app.post("/payments")
    def post_payment() -> Response:
        req = _parse(request.get_json(silent=True))
        g.conn = pool.getconn()
        status, body = create_payment(g.conn, req)
        return _json(status, body)

    return app
