"""`payment-service check`: does the database hold what the service promises?

Each check is one read-only SQL query that returns its violations as `(id, detail)` rows; every
query runs in one REPEATABLE READ snapshot, so the checks agree with each other even while the API
and the relay are writing. Exit 0 when every check passes, 1 when one fails, 2 when the database
cannot be read.

Two housekeeping jobs delete rows legitimately, and the rules account for them exactly:

- Idempotency records expire `IDEMPOTENCY_KEY_TTL` seconds after they were claimed and are then
  purged, or replaced when a new request claims the expired key. A claim row is written in the
  transaction that creates its payment or refund, so it shares that row's `created_at` (the
  transaction's `now()`). Hence a payment or refund created less than the TTL ago must still have
  its claim row (`key_hash = idempotency_hash` of the same `caller`, same `created_at`, a 2xx
  answer naming it); an older one may have lost it. Run the check with the API's
  `IDEMPOTENCY_KEY_TTL`: a larger value reports rows that were purged legitimately, a smaller one
  only checks fewer rows.
- Delivered outbox events are deleted `OUTBOX_RETENTION_HOURS` after delivery, so an event is
  required only for a state change made less than the retention ago (an event is created with its
  state change and delivered after it). Duplicates, orphans and contradictions are reported at any
  age.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TextIO

import asyncpg

from payment_service.config import Settings
from payment_service.database import UNAVAILABLE_ERRORS, connect
from payment_service.entry import printable
from payment_service.sql import Statement

EXAMPLES_PER_CHECK = 20
REPORT_WIDTH = 100


@dataclass(frozen=True)
class Check:
    """One invariant: its name, what it asserts, and a query returning `(id, detail)` violations.

    Queries may name two parameters (timestamptz, from the snapshot's `now()`): `:keys_since`, the
    oldest creation time that still needs its idempotency record, and `:events_since`, the oldest
    state change that still needs its outbox event.
    """

    name: str
    subject: str
    assertion: str
    sql: str


def _key_record_check(subject: str, *, table: str, alias: str, id_column: str) -> Check:
    """`<subject>_idempotency`: each young row has the claim of its key made in its transaction,
    answering 2xx with this row. One query for payments and refunds alike (names from constants)."""
    a = alias
    kind = "CHARGE" if subject == "payment" else "REFUND"  # its gateway operation's kind
    return Check(
        f"{subject}_idempotency",
        subject,
        f"each {subject} younger than IDEMPOTENCY_KEY_TTL has its idempotency record: the claim "
        f"of its key made in the same transaction, answering 2xx with this {subject} (or not "
        f"answering yet while the {subject} is being made at the gateway)",
        # Young rows only; one primary-key probe each.
        f"""
        SELECT {a}.{id_column} AS id,
               CASE WHEN k.key_hash IS NULL THEN 'no idempotency record for its key'
                    WHEN k.created_at <> {a}.created_at
                        THEN 'its key was claimed again at ' || k.created_at
                             || ' before expiring'
                    WHEN k.response_status IS NULL
                        THEN 'its key has no answer, and nothing is being made at the gateway'
                    ELSE 'its idempotency record answers ' || k.response_status
                         || ' with {subject} '
                         || coalesce(k.response_data ->> '{id_column}', 'none')
               END AS detail
        FROM {table} AS {a}
        LEFT JOIN idempotency_keys AS k
               ON k.key_hash = {a}.idempotency_hash AND k.caller = {a}.caller
        WHERE {a}.created_at > :keys_since
          AND (k.key_hash IS NULL
               OR k.created_at <> {a}.created_at
               OR (k.response_status IS NULL
                   -- a key without its answer yet: only while its operation is being made
                   AND NOT EXISTS (SELECT 1
                                   FROM gateway_operations AS o
                                   WHERE o.{id_column} = {a}.{id_column}
                                     AND o.kind = '{kind}'
                                     AND o.phase = 'STARTED'))
               OR k.response_status NOT BETWEEN 200 AND 299
               OR (k.response_status IS NOT NULL
                   AND (k.response_data ->> '{id_column}')
                       IS DISTINCT FROM {a}.{id_column}::text))
        """,
    )


CHECKS: tuple[Check, ...] = (
    Check(
        "payment_events",
        "payment",
        "each payment has the events of its state changes, once each and in order: "
        "payment.pending when it was answered PENDING, then payment.succeeded or "
        "payment.failed when decided (a charge still being made at the gateway has none yet)",
        # One scan of the outbox grouped by payment, hash-joined to payments.
        """
        SELECT payment_id AS id, detail
        FROM (
            SELECT p.payment_id,
                   concat_ws('; ',
                       CASE WHEN e.pending > 1 THEN e.pending || ' payment.pending events' END,
                       CASE WHEN e.succeeded > 1
                            THEN e.succeeded || ' payment.succeeded events' END,
                       CASE WHEN e.failed > 1 THEN e.failed || ' payment.failed events' END,
                       CASE WHEN p.status = 'PENDING' AND (e.succeeded > 0 OR e.failed > 0)
                            THEN 'status PENDING but a settlement event exists' END,
                       CASE WHEN p.status = 'FAILED' AND e.succeeded > 0
                            THEN 'status FAILED but a payment.succeeded event exists' END,
                       CASE WHEN p.status IN ('SUCCESS', 'PARTIALLY_REFUNDED', 'REFUNDED')
                                 AND e.failed > 0
                            THEN 'status ' || p.status || ' but a payment.failed event exists' END,
                       CASE WHEN e.last_pending > e.first_settled
                            THEN 'settlement event before the payment.pending event' END,
                       CASE WHEN e.first_refunded < e.last_charge
                            THEN 'refund event before the charge event' END,
                       -- Required events, for state changes younger than the retention. A
                       -- payment whose charge is still being made at the gateway (its request
                       -- has not answered) has no event yet.
                       CASE WHEN p.status = 'PENDING' AND p.created_at > :events_since
                                 AND coalesce(e.pending, 0) = 0
                                 AND NOT EXISTS (SELECT 1
                                                 FROM gateway_operations AS o
                                                 WHERE o.payment_id = p.payment_id
                                                   AND o.kind = 'CHARGE'
                                                   AND o.phase = 'STARTED')
                            THEN 'no payment.pending event' END,
                       CASE WHEN p.status = 'FAILED' AND p.updated_at > :events_since
                                 AND coalesce(e.failed, 0) = 0
                            THEN 'no payment.failed event' END,
                       CASE WHEN p.status IN ('SUCCESS', 'PARTIALLY_REFUNDED', 'REFUNDED')
                                 AND p.created_at > :events_since AND coalesce(e.succeeded, 0) = 0
                            THEN 'no payment.succeeded event' END
                   ) AS detail
            FROM payments AS p
            LEFT JOIN (
                SELECT aggregate_id,
                       count(*) FILTER (WHERE event_type = 'payment.pending')   AS pending,
                       count(*) FILTER (WHERE event_type = 'payment.succeeded') AS succeeded,
                       count(*) FILTER (WHERE event_type = 'payment.failed')    AS failed,
                       max(id) FILTER (WHERE event_type = 'payment.pending')    AS last_pending,
                       min(id) FILTER (WHERE event_type IN ('payment.succeeded', 'payment.failed'))
                                                                                AS first_settled,
                       max(id) FILTER (WHERE event_type NOT IN ('payment.refunded',
                                                                 'refund.failed'))
                                                                                AS last_charge,
                       min(id) FILTER (WHERE event_type IN ('payment.refunded', 'refund.failed'))
                                                                                AS first_refunded
                FROM outbox_events
                GROUP BY aggregate_id
            ) AS e ON e.aggregate_id = p.payment_id
        ) AS v
        WHERE detail <> ''
        """,
    ),
    Check(
        "refund_events",
        "refund",
        "each refund has exactly one event of its result (payment.refunded when REFUNDED, "
        "refund.failed when FAILED, none while PENDING), and each such event names a refund of "
        "its payment",
        # Refunds full-outer-joined to the refund events grouped by (payment, refund, type). The
        # join compares text, so a payload whose refund_id is not a number is reported, not an
        # error.
        """
        SELECT coalesce(r.refund_id::text, e.refund_id, 'null') AS id,
               CASE WHEN r.refund_id IS NULL
                        THEN e.events || ' ' || e.event_type || ' event(s) of payment '
                             || e.aggregate_id || ' name no refund of that payment'
                    WHEN e.events > 1
                        THEN e.events || ' ' || e.event_type || ' events'
                    WHEN e.event_type IS NOT NULL
                        THEN 'a ' || e.event_type || ' event for a refund with status ' || r.status
                    ELSE 'no ' || r.expected || ' event'
               END AS detail
        FROM (SELECT refund_id, payment_id, status, created_at,
                     CASE status WHEN 'REFUNDED' THEN 'payment.refunded'
                                 WHEN 'FAILED' THEN 'refund.failed' END AS expected
              FROM payment_refunds) AS r
        FULL JOIN (
            SELECT aggregate_id, payload ->> 'refund_id' AS refund_id, event_type,
                   count(*) AS events
            FROM outbox_events
            WHERE event_type IN ('payment.refunded', 'refund.failed')
            GROUP BY 1, 2, 3
        ) AS e ON e.aggregate_id = r.payment_id AND e.refund_id = r.refund_id::text
        WHERE r.refund_id IS NULL
           OR e.events > 1
           OR (e.event_type IS NOT NULL AND e.event_type IS DISTINCT FROM r.expected)
           OR (r.expected IS NOT NULL AND e.event_type IS NULL AND r.created_at > :events_since)
        """,
    ),
    Check(
        "event_payloads",
        "event",
        "each event is about an existing payment and its payload names the same event, type and "
        "payment as its row",
        """
        SELECT o.id,
               concat_ws('; ',
                   CASE WHEN p.payment_id IS NULL
                        THEN 'payment ' || o.aggregate_id || ' does not exist' END,
                   CASE WHEN (o.payload ->> 'event_id') IS DISTINCT FROM o.event_id::text
                        THEN 'payload event_id differs from the row' END,
                   CASE WHEN (o.payload ->> 'event_type') IS DISTINCT FROM o.event_type
                        THEN 'payload event_type differs from the row' END,
                   CASE WHEN (o.payload ->> 'payment_id') IS DISTINCT FROM o.aggregate_id::text
                        THEN 'payload payment_id differs from aggregate_id' END
               ) AS detail
        FROM outbox_events AS o
        LEFT JOIN payments AS p ON p.payment_id = o.aggregate_id
        WHERE p.payment_id IS NULL
           OR (o.payload ->> 'event_id') IS DISTINCT FROM o.event_id::text
           OR (o.payload ->> 'event_type') IS DISTINCT FROM o.event_type
           OR (o.payload ->> 'payment_id') IS DISTINCT FROM o.aggregate_id::text
        """,
    ),
    Check(
        "event_deliveries",
        "event",
        "each event younger than the retention has a delivery to every endpoint that wants its "
        "type and was ACTIVE or PAUSED, unchanged, since before the event was written",
        # An endpoint changed after the event (state, types, URL, secret) is not required: its
        # types may have been different then. DISABLED endpoints get no new deliveries. A delivery
        # is created with its event and is delivered after it, so the retention window that
        # bounds `payment_events` bounds this too.
        """
        SELECT e.id,
               'no delivery to endpoint ' || string_agg(n.name, ', ' ORDER BY n.name) AS detail
        FROM outbox_events AS e
        JOIN endpoints AS n
          ON endpoint_wants(n.event_types, e.event_type)
         AND n.state IN ('ACTIVE', 'PAUSED')
         AND greatest(n.created_at, n.state_changed_at, n.updated_at) <= e.created_at
        WHERE e.created_at > :events_since
          AND NOT EXISTS (SELECT 1
                          FROM deliveries AS d
                          WHERE d.event_id = e.id AND d.endpoint_id = n.endpoint_id)
        GROUP BY e.id
        """,
    ),
    Check(
        "delivery_rows",
        "delivery",
        "each delivery is about its event's payment, which exists, and is delivered exactly "
        "when its status says so",
        """
        SELECT d.delivery_id AS id,
               concat_ws('; ',
                   CASE WHEN d.aggregate_id <> e.aggregate_id
                        THEN 'payment ' || d.aggregate_id || ' but its event is about payment '
                             || e.aggregate_id END,
                   CASE WHEN p.payment_id IS NULL
                        THEN 'payment ' || e.aggregate_id || ' does not exist' END,
                   CASE WHEN (d.status = 'DELIVERED') <> (d.delivered_at IS NOT NULL)
                        THEN 'status ' || d.status || CASE WHEN d.delivered_at IS NULL
                                                           THEN ' without delivered_at'
                                                           ELSE ' with delivered_at' END END
               ) AS detail
        FROM deliveries AS d
        JOIN outbox_events AS e ON e.id = d.event_id
        LEFT JOIN payments AS p ON p.payment_id = e.aggregate_id
        WHERE d.aggregate_id <> e.aggregate_id
           OR p.payment_id IS NULL
           OR (d.status = 'DELIVERED') <> (d.delivered_at IS NOT NULL)
        """,
    ),
    Check(
        "orphan_refunds",
        "refund",
        "each refund belongs to an existing payment",
        """
        SELECT r.refund_id AS id, 'payment ' || r.payment_id || ' does not exist' AS detail
        FROM payment_refunds AS r
        WHERE NOT EXISTS (SELECT 1 FROM payments AS p WHERE p.payment_id = r.payment_id)
        """,
    ),
    Check(
        "refund_sums",
        "payment",
        "the refunds of each payment sum to its refunded_amount, which never exceeds its amount",
        """
        SELECT p.payment_id AS id,
               'refunds sum to ' || coalesce(r.total, 0) || ', refunded_amount is '
               || p.refunded_amount || ', amount is ' || p.amount AS detail
        FROM payments AS p
        LEFT JOIN (
            SELECT payment_id, sum(amount) AS total
            FROM payment_refunds
            WHERE status = 'REFUNDED'
            GROUP BY payment_id
        ) AS r ON r.payment_id = p.payment_id
        WHERE coalesce(r.total, 0) <> p.refunded_amount
           OR coalesce(r.total, 0) > p.amount
           OR p.refunded_amount > p.amount
        """,
    ),
    Check(
        "refund_status",
        "payment",
        "each payment's status agrees with its refunds: REFUNDED iff refunded_amount = amount, "
        "PARTIALLY_REFUNDED iff 0 < refunded_amount < amount, nothing refunded otherwise",
        """
        SELECT payment_id AS id,
               'status ' || status || ' with refunded_amount ' || refunded_amount
               || ' of ' || amount AS detail
        FROM payments
        WHERE (status = 'REFUNDED') <> (refunded_amount = amount)
           OR (status = 'PARTIALLY_REFUNDED') <> (refunded_amount > 0 AND refunded_amount < amount)
           OR (status IN ('PENDING', 'SUCCESS', 'FAILED') AND refunded_amount <> 0)
        """,
    ),
    _key_record_check("payment", table="payments", alias="p", id_column="payment_id"),
    _key_record_check("refund", table="payment_refunds", alias="r", id_column="refund_id"),
    Check(
        "orphan_idempotency",
        "idempotency key",
        "each stored 2xx answer names a payment or refund that exists (a refund made with "
        "that key)",
        # Keys are few (purged after the TTL); one primary-key probe per stored answer. An id that
        # is not a number matches nothing, so it is reported rather than failing the cast.
        """
        SELECT k.id, k.detail
        FROM (
            SELECT caller || ':' || left(key_hash, 16) || '…' AS id,
                   CASE WHEN response_data ? 'refund_id'
                             AND NOT EXISTS (
                                 SELECT 1 FROM payment_refunds AS r
                                 WHERE r.refund_id = CASE
                                           WHEN response_data ->> 'refund_id' ~ '^[0-9]{1,18}$'
                                           THEN (response_data ->> 'refund_id')::bigint END
                                   AND r.idempotency_hash = key_hash
                                   AND r.caller = idempotency_keys.caller)
                            THEN 'answered refund ' || (response_data ->> 'refund_id')
                                 || ', which does not exist with this key'
                        WHEN NOT response_data ? 'refund_id'
                             AND response_data ? 'payment_id'
                             AND NOT EXISTS (
                                 SELECT 1 FROM payments AS p
                                 WHERE p.payment_id = CASE
                                           WHEN response_data ->> 'payment_id' ~ '^[0-9]{1,18}$'
                                           THEN (response_data ->> 'payment_id')::bigint END)
                            THEN 'answered payment ' || (response_data ->> 'payment_id')
                                 || ', which does not exist'
                   END AS detail
            FROM idempotency_keys
            WHERE response_status BETWEEN 200 AND 299
              AND jsonb_typeof(response_data) = 'object'
        ) AS k
        WHERE k.detail IS NOT NULL
        """,
    ),
    Check(
        "keys_in_progress",
        "idempotency key",
        "an idempotency key without an answer belongs to a charge or refund still being made at "
        "the gateway (its operation STARTED)",
        # Keys are few; one index probe each on the operation's key.
        """
        SELECT k.caller || ':' || left(k.key_hash, 16) || '…' AS id,
               'no answer, and no charge or refund of it is being made (STARTED)' AS detail
        FROM idempotency_keys AS k
        WHERE k.response_status IS NULL
          AND NOT EXISTS (SELECT 1
                          FROM gateway_operations AS o
                          WHERE o.key_hash = k.key_hash
                            AND o.caller = k.caller
                            AND o.created_at = k.created_at
                            AND o.phase = 'STARTED')
        """,
    ),
    Check(
        "gateway_charges",
        "payment",
        "each payment charged at the gateway is decided (not PENDING) exactly when its charge is "
        "DONE, and a payment that the gateway charged has the intent it recorded before "
        "confirming it",
        """
        SELECT p.payment_id AS id,
               concat_ws('; ',
                   CASE WHEN p.status <> 'PENDING' AND o.phase <> 'DONE'
                        THEN 'status ' || p.status || ' but its charge is ' || o.phase END,
                   CASE WHEN p.status = 'PENDING' AND o.phase = 'DONE'
                        THEN 'status PENDING but its charge is DONE' END,
                   CASE WHEN p.status IN ('SUCCESS', 'PARTIALLY_REFUNDED', 'REFUNDED')
                             AND o.intent_id IS NULL
                        THEN 'status ' || p.status || ' without a recorded intent' END
               ) AS detail
        FROM payments AS p
        JOIN gateway_operations AS o ON o.payment_id = p.payment_id AND o.kind = 'CHARGE'
        WHERE (p.status <> 'PENDING') <> (o.phase = 'DONE')
           OR (p.status IN ('SUCCESS', 'PARTIALLY_REFUNDED', 'REFUNDED')
               AND o.intent_id IS NULL)
        """,
    ),
    Check(
        "gateway_refunds",
        "refund",
        "each refund is PENDING exactly while it is being made at the gateway (its operation "
        "not DONE), and one the gateway made has the gateway's id",
        """
        SELECT r.refund_id AS id,
               CASE WHEN o.operation_id IS NULL
                        THEN 'status PENDING without a refund at the gateway'
                    WHEN r.status = 'PENDING'
                        THEN 'status PENDING but its operation is DONE'
                    WHEN o.phase <> 'DONE'
                        THEN 'status ' || r.status || ' but its operation is ' || o.phase
                    ELSE 'status REFUNDED without the gateway''s id of it'
               END AS detail
        FROM payment_refunds AS r
        LEFT JOIN gateway_operations AS o ON o.refund_id = r.refund_id AND o.kind = 'REFUND'
        WHERE (r.status = 'PENDING' AND (o.operation_id IS NULL OR o.phase = 'DONE'))
           OR (r.status <> 'PENDING' AND o.phase <> 'DONE')
           OR (r.status = 'REFUNDED' AND o.operation_id IS NOT NULL
               AND r.gateway_refund_id IS NULL)
        """,
    ),
    Check(
        "refund_reservations",
        "payment",
        "each payment's reserved_amount is the sum of its refunds still being made (PENDING), "
        "and refunded_amount + reserved_amount never exceeds its amount",
        """
        SELECT p.payment_id AS id,
               'PENDING refunds sum to ' || coalesce(r.total, 0) || ', reserved_amount is '
               || p.reserved_amount || ', refunded_amount ' || p.refunded_amount
               || ', amount ' || p.amount AS detail
        FROM payments AS p
        LEFT JOIN (
            SELECT payment_id, sum(amount) AS total
            FROM payment_refunds
            WHERE status = 'PENDING'
            GROUP BY payment_id
        ) AS r ON r.payment_id = p.payment_id
        WHERE coalesce(r.total, 0) <> p.reserved_amount
           OR p.refunded_amount + p.reserved_amount > p.amount
        """,
    ),
)

SUMMARY_SQL = """
SELECT (SELECT count(*) FROM payments)         AS payments,
       (SELECT count(*) FROM payment_refunds)  AS refunds,
       (SELECT count(*) FROM idempotency_keys) AS idempotency_keys,
       (SELECT count(*) FROM outbox_events)    AS events,
       (SELECT count(*) FROM endpoints)        AS endpoints,
       (SELECT count(*) FROM deliveries)       AS deliveries,
       (SELECT count(*) FROM deliveries WHERE status = 'PENDING') AS deliveries_pending,
       (SELECT count(*) FROM deliveries WHERE status = 'DEAD')    AS deliveries_dead,
       (SELECT count(*) FROM gateway_operations WHERE phase <> 'DONE') AS gateway_open,
       (SELECT count(*) FROM gateway_operations WHERE phase = 'REVIEW') AS gateway_review,
       now()                                   AS checked_at
"""


def _violations(check: Check) -> Statement:
    """The statement that runs a check: its first `:examples` violations and their total."""
    return Statement(
        f"""
        SELECT id::text AS id, detail, count(*) OVER () AS total
        FROM ({check.sql}) AS violations
        ORDER BY violations.id
        LIMIT :examples
        """
    )


# Compiled once, at import; the text sent is the same on every run.
STATEMENTS = {check.name: _violations(check) for check in CHECKS}


@dataclass
class CheckResult:
    name: str
    subject: str
    assertion: str
    ok: bool
    violations: int
    examples: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Report:
    consistent: bool
    checked_at: str
    idempotency_key_ttl_seconds: int
    outbox_retention_hours: float
    summary: dict[str, int]
    checks: list[CheckResult]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


async def check_database(
    conn: asyncpg.Connection,
    *,
    idempotency_key_ttl: int,
    outbox_retention_hours: float,
    examples: int = EXAMPLES_PER_CHECK,
) -> Report:
    """Run every check in one read-only snapshot and return the report."""
    results: list[CheckResult] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        summary = dict(await conn.fetchrow(SUMMARY_SQL))
        checked_at: datetime = summary.pop("checked_at")
        keys_since = checked_at - timedelta(seconds=idempotency_key_ttl)
        # With no retention every delivered event may be gone at once: require none.
        events_since = (
            checked_at - timedelta(hours=outbox_retention_hours)
            if outbox_retention_hours > 0
            else checked_at
        )
        windows = {"keys_since": keys_since, "events_since": events_since, "examples": examples}
        for check in CHECKS:
            statement = STATEMENTS[check.name]
            rows = await conn.fetch(
                statement.sql, *statement.args(**{name: windows[name] for name in statement.names})
            )
            total = int(rows[0]["total"]) if rows else 0
            results.append(
                CheckResult(
                    name=check.name,
                    subject=check.subject,
                    assertion=check.assertion,
                    ok=total == 0,
                    violations=total,
                    examples=[{"id": row["id"], "detail": row["detail"]} for row in rows],
                )
            )
    return Report(
        consistent=all(result.ok for result in results),
        checked_at=checked_at.isoformat(),
        idempotency_key_ttl_seconds=idempotency_key_ttl,
        outbox_retention_hours=outbox_retention_hours,
        summary={key: int(value) for key, value in summary.items()},
        checks=results,
    )


def render_text(report: Report, out: TextIO) -> None:
    """The human-readable report: one line per check, examples under each failure."""
    s = report.summary
    print(
        f"payment-service check at {report.checked_at}: {s['payments']} payments, "
        f"{s['refunds']} refunds, {s['idempotency_keys']} idempotency keys, {s['events']} events, "
        f"{s['deliveries']} deliveries to {s['endpoints']} endpoints ({s['deliveries_pending']} "
        f"pending, {s['deliveries_dead']} dead), {s['gateway_open']} charges and refunds open at "
        f"the gateway ({s['gateway_review']} flagged for review)",
        file=out,
    )
    print(
        f"windows: idempotency records required for rows younger than "
        f"{report.idempotency_key_ttl_seconds} s; events for state changes younger than "
        f"{report.outbox_retention_hours:g} h",
        file=out,
    )
    width = max(len(result.name) for result in report.checks)
    for result in report.checks:
        mark = "ok  " if result.ok else "FAIL"
        lead = f"  {mark}  {result.name:<{width}}  "
        print(
            textwrap.fill(
                result.assertion,
                REPORT_WIDTH,
                initial_indent=lead,
                subsequent_indent=" " * len(lead),
            ),
            file=out,
        )
        if not result.ok:
            print(f"        {result.violations} {result.subject}(s) violate it:", file=out)
            for example in result.examples:
                # ids and details quote the data (a payload's refund_id, say): escaped
                line = f"          {result.subject} {example['id']}: {example['detail']}"
                print(printable(line), file=out)
            if result.violations > len(result.examples):
                print(f"          … and {result.violations - len(result.examples)} more", file=out)
    failed = sum(not result.ok for result in report.checks)
    verdict = (
        "consistent"
        if report.consistent
        else f"INCONSISTENT: {failed} of {len(report.checks)} checks failed"
    )
    print(verdict, file=out)


async def _run(settings: Settings) -> Report:
    conn = await connect(settings.dsn())
    try:
        return await check_database(
            conn,
            idempotency_key_ttl=settings.idempotency_key_ttl,
            outbox_retention_hours=settings.outbox_retention_hours,
        )
    finally:
        await conn.close()


def run_check(settings: Settings, as_json: bool = False) -> int:
    """The `check` command: 0 consistent, 1 inconsistent, 2 the database could not be read."""
    try:
        report = asyncio.run(_run(settings))
    except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError) as error:
        print(
            f"payment-service check: cannot read the database: {printable(error)}", file=sys.stderr
        )
        return 2
    if as_json:
        print(report.to_json())
    else:
        render_text(report, sys.stdout)
    return 0 if report.consistent else 1
