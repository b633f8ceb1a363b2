"""Reconciliation: our charges and refunds against the gateway's, both ways, over a window.

`reconcile(conn, gateway, since=…, until=…)` compares what we recorded about the charges and
refunds staged at the gateway in [since, until) with the intents and refunds the gateway created
in that window (`Gateway.list_since`; each carries our payment and refund ids in its metadata),
and answers a `Reconciliation`: its `differences` (money that moved one way on our side and
another at the gateway) and its `notes` (what is worth seeing and is not a difference).

Differences:
- `charged_without_intent`: a payment we hold charged (SUCCESS, PARTIALLY_REFUNDED, REFUNDED)
  with no succeeded intent at the gateway;
- `charged_at_gateway`: an intent that moved money (succeeded) or may still move it (processing)
  for a payment we hold FAILED;
- `unknown_payment`: such an intent for a payment we do not know (no such id, or no charge of
  ours at the gateway);
- `amount_mismatch`: the succeeded intent's amount or currency is not the payment's;
- `several_confirmed_intents`: more than one intent of one payment was confirmed;
- `refund_missing_at_gateway`: a refund we hold REFUNDED with no succeeded refund at the gateway;
- `refunded_at_gateway`: a succeeded or pending gateway refund of a refund we hold FAILED;
- `unknown_refund`: such a gateway refund of an intent of ours that no refund of ours made (made
  outside the service, or an id we do not know);
- `refund_amount_mismatch`, `several_refunds`: as for charges.

Not differences (notes): intents never confirmed or canceled (nothing moved through them: an
intent is created before it is confirmed, and a crash between the two leaves one), failed intents
of a payment we do not know, payments and refunds still PENDING (undecided: the gateway worker or
the webhook finishes them, and the review queue shows those whose outcome stays unknown), and
objects at the gateway that were not made by this service (no payment id of ours, or one of our
ids with another payment's reference, or a refund of an intent we did not record: another
deployment sharing the account).

Payments recorded without a gateway (GATEWAY=none, CASH) have no charge at the gateway and are
not compared. The window of our side is the staging time of each charge or refund; the gateway is
listed over a wider window (`EDGE_SECONDS` either side) so that an intent created just after a
charge staged just before `until` is found, and an intent recorded but created outside even that
(a charge finished late by the worker) is asked for by its id. A scheduled run (`decided_since`)
also compares the charges and refunds decided since its window's start, whenever they were
staged: a payment still PENDING at one run (a note) and settled hours later is compared at the
next, its objects at the gateway asked for by id. The gateway is listed before our rows are read:
a charged_without_intent, charged_at_gateway or refund_missing_at_gateway is recorded only if the
object it is about, asked for again after our read, still makes it one.
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import asyncpg

from payment_service.gateway.interface import (
    Gateway,
    GatewayNotFound,
    Intent,
    IntentStatus,
    Refund,
    RefundStatus,
)
from payment_service.sql import Statement

# How far beyond the window the gateway is listed: an object is created at the gateway a little
# after its charge or refund was staged here, and clocks differ.
EDGE_SECONDS = 300
# The gateway is listed one chunk at a time (progress shows each): one day.
CHUNK = timedelta(days=1)
# The longest window one run compares: a longer one is split by the caller.
MAX_WINDOW = timedelta(days=366)

# Our payment statuses that say the money moved.
CHARGED_STATUSES = frozenset({"SUCCESS", "PARTIALLY_REFUNDED", "REFUNDED"})
# Intent statuses through which money moved or may still move.
MOVING_INTENT = frozenset({IntentStatus.SUCCEEDED, IntentStatus.PROCESSING})
# Gateway refund statuses through which money left or may still leave.
MOVING_REFUND = frozenset({RefundStatus.SUCCEEDED, RefundStatus.PENDING})


class Kind(enum.StrEnum):
    """What a finding is: a difference, or a note."""

    CHARGED_WITHOUT_INTENT = "charged_without_intent"
    CHARGED_AT_GATEWAY = "charged_at_gateway"
    UNKNOWN_PAYMENT = "unknown_payment"
    AMOUNT_MISMATCH = "amount_mismatch"
    SEVERAL_CONFIRMED_INTENTS = "several_confirmed_intents"
    REFUND_MISSING_AT_GATEWAY = "refund_missing_at_gateway"
    REFUNDED_AT_GATEWAY = "refunded_at_gateway"
    UNKNOWN_REFUND = "unknown_refund"
    REFUND_AMOUNT_MISMATCH = "refund_amount_mismatch"
    SEVERAL_REFUNDS = "several_refunds"
    # notes
    ORPHAN_INTENT = "orphan_intent"
    UNDECIDED_PAYMENT = "undecided_payment"
    UNDECIDED_REFUND = "undecided_refund"
    NOT_OURS = "not_ours"


NOTE_KINDS = frozenset(
    {Kind.ORPHAN_INTENT, Kind.UNDECIDED_PAYMENT, Kind.UNDECIDED_REFUND, Kind.NOT_OURS}
)


@dataclass(frozen=True)
class Finding:
    """One difference or note: what it is, the ids it is about, and a sentence."""

    kind: Kind
    detail: str
    payment_id: int | None = None
    refund_id: int | None = None
    intent_id: str | None = None
    gateway_refund_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind.value}


@dataclass
class Reconciliation:
    """The result of one run over [since, until)."""

    since: datetime
    until: datetime
    payments: int = 0  # our charges compared
    refunds: int = 0  # our refunds compared
    intents: int = 0  # the gateway's intents listed in the window
    gateway_refunds: int = 0
    differences: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)
    # Orphans (notes too) that nothing of ours will ever confirm: intents created for a payment
    # whose operation recorded another intent (a create whose answer was lost, made again). The
    # scheduled run cancels them, so that nobody can confirm them later; a run by hand only
    # lists them.
    abandoned: list[Finding] = field(default_factory=list)

    def add(self, finding: Finding) -> None:
        (self.notes if finding.kind in NOTE_KINDS else self.differences).append(finding)

    @property
    def consistent(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "consistent": self.consistent,
            "compared": {
                "payments": self.payments,
                "refunds": self.refunds,
                "intents": self.intents,
                "gateway_refunds": self.gateway_refunds,
            },
            "differences": [f.to_json() for f in self.differences],
            "notes": [f.to_json() for f in self.notes],
        }


class WindowError(ValueError):
    """The window cannot be reconciled (the message says why, in one line)."""


def check_window(since: datetime, until: datetime, *, now: datetime | None = None) -> None:
    """Raise `WindowError` unless [since, until) is a window one run can compare (pure)."""
    now = now or datetime.now(UTC)
    if since.tzinfo is None or until.tzinfo is None:
        raise WindowError("times need a timezone (e.g. 2026-01-31T00:00:00Z)")
    if since >= now:
        raise WindowError(f"--since {since.isoformat()} is not in the past")
    if until <= since:
        raise WindowError("--until must be after --since")
    if until - since > MAX_WINDOW:
        raise WindowError(f"the window is longer than {MAX_WINDOW.days} days: split it")


# -- our side ------------------------------------------------------------------------------------
# Three index scans, not one OR over them (which reads the whole table): the operations staged in
# the window; those of the ids the gateway's objects in the window name; and, in a scheduled run
# (:decided_since), those decided since, whatever window they were staged in.
def _operations(kind: str, our_id: str) -> str:
    """The CTE `ops`: the operations of `kind` to compare, by `our_id` (the column the gateway's
    objects name)."""
    return f"""ops AS (
        SELECT operation_id FROM gateway_operations
         WHERE kind = '{kind}' AND created_at >= :since AND created_at < :until
        UNION
        SELECT operation_id FROM gateway_operations
         WHERE kind = '{kind}' AND {our_id} = ANY(:{our_id}s::bigint[])
        UNION
        SELECT operation_id FROM gateway_operations
         WHERE kind = '{kind}' AND phase = 'DONE' AND updated_at >= :decided_since
    )"""


CHARGES = Statement(
    f"""
    WITH {_operations("CHARGE", "payment_id")}
    SELECT p.payment_id, p.status, p.amount, p.currency, p.reference, o.intent_id, o.phase
      FROM ops
      JOIN gateway_operations AS o ON o.operation_id = ops.operation_id
      JOIN payments AS p ON p.payment_id = o.payment_id
    """
)

REFUNDS = Statement(
    f"""
    WITH {_operations("REFUND", "refund_id")}
    SELECT r.refund_id, r.payment_id, r.amount, r.status, p.currency,
           coalesce(r.gateway_refund_id, o.gateway_refund_id) AS gateway_refund_id, o.intent_id
      FROM ops
      JOIN gateway_operations AS o ON o.operation_id = ops.operation_id
      JOIN payment_refunds AS r ON r.refund_id = o.refund_id
      JOIN payments AS p ON p.payment_id = r.payment_id
    """
)

CHARGES_OF_INTENTS = Statement(
    """
    SELECT intent_id, payment_id
      FROM gateway_operations
     WHERE kind = 'CHARGE'
       AND intent_id = ANY(:intent_ids::text[])
    """
)

Progress = Callable[[str], None]


async def reconcile(
    conn: asyncpg.Connection,
    gateway: Gateway,
    *,
    since: datetime,
    until: datetime,
    decided_since: datetime | None = None,
    progress: Progress | None = None,
) -> Reconciliation:
    """Compare our charges and refunds staged in [since, until) with the gateway's intents and
    refunds created in it, both ways; with `decided_since` (a scheduled run), also those decided
    since then, whenever staged (their objects at the gateway asked for by id). Raises
    `WindowError` for a window it cannot compare and the gateway's errors (`GatewayError`) when
    the gateway cannot be listed."""
    check_window(since, until)
    say = progress or (lambda _message: None)
    intents, gateway_refunds = await _list(gateway, since, until, say)
    result = Reconciliation(since=since, until=until)
    in_window = [i for i in intents.values() if since <= i.created < until]
    refunds_in_window = [r for r in gateway_refunds.values() if since <= r.created < until]
    result.intents, result.gateway_refunds = len(in_window), len(refunds_in_window)

    say("reading our charges and refunds")
    charges = {
        row["payment_id"]: row
        for row in await conn.fetch(
            CHARGES.sql,
            *CHARGES.args(
                since=since,
                until=until,
                decided_since=decided_since,
                payment_ids=sorted({i.payment_id for i in in_window if i.payment_id is not None}),
            ),
        )
    }
    refunds = {
        row["refund_id"]: row
        for row in await conn.fetch(
            REFUNDS.sql,
            *REFUNDS.args(
                since=since,
                until=until,
                decided_since=decided_since,
                refund_ids=sorted(
                    {r.refund_id for r in refunds_in_window if r.refund_id is not None}
                ),
            ),
        )
    }
    result.payments, result.refunds = len(charges), len(refunds)

    say(f"comparing {len(charges)} charges and {len(refunds)} refunds with the gateway's")
    await _charges(result, gateway, charges, intents.values(), in_window)
    await _refunds(result, conn, gateway, refunds, gateway_refunds.values(), refunds_in_window)
    return result


async def _list(
    gateway: Gateway, since: datetime, until: datetime, say: Progress
) -> tuple[dict[str, Intent], dict[str, Refund]]:
    """The gateway's intents and refunds created in the window widened by EDGE_SECONDS, by id."""
    start = since - timedelta(seconds=EDGE_SECONDS)
    end = until + timedelta(seconds=EDGE_SECONDS)
    chunks = max(1, -(-(end - start) // CHUNK))
    intents: dict[str, Intent] = {}
    refunds: dict[str, Refund] = {}
    for number in range(chunks):
        chunk_start = start + number * CHUNK
        chunk_end = min(chunk_start + CHUNK, end)
        if chunks > 1:
            say(f"listing the gateway, day {number + 1} of {chunks}")
        listing = await gateway.list_since(chunk_start, chunk_end)
        intents.update((i.id, i) for i in listing.intents)
        refunds.update((r.id, r) for r in listing.refunds)
    return intents, refunds


async def _charges(
    result: Reconciliation,
    gateway: Gateway,
    charges: dict[int, asyncpg.Record],
    intents: Iterable[Intent],
    in_window: list[Intent],
) -> None:
    of_payment = _grouped(intents, lambda intent: intent.payment_id)
    # The gateway's side: intents in the window for payments we do not hold, or not as theirs.
    for intent in in_window:
        stranger = _stranger(intent, charges)
        if stranger is not None:
            kind, detail = stranger
            result.add(Finding(kind, detail, payment_id=intent.payment_id, intent_id=intent.id))
    # Our side: each charge against its intents.
    for payment_id, charge in sorted(charges.items()):
        listed = {
            i.id: i for i in of_payment.get(payment_id, {}).values() if _same_reference(charge, i)
        }
        intents_now = await _with_recorded(listed, charge["intent_id"], gateway.retrieve)
        await compare_again(result, _compare_charge, charge, intents_now, gateway.retrieve)


def _stranger(intent: Intent, charges: dict[int, asyncpg.Record]) -> tuple[Kind, str] | None:
    """What an intent in the window is when it is not one of the charges compared (pure)."""
    charge = charges.get(intent.payment_id) if intent.payment_id is not None else None
    if intent.payment_id is None:
        return Kind.NOT_OURS, "an intent without our payment id"
    if charge is not None and not _same_reference(charge, intent):
        # Our payment id with another payment's reference: another deployment charging at the
        # same account (test accounts are often shared), whose ids start at 1 too.
        return Kind.NOT_OURS, f"an intent naming payment {intent.payment_id} with another reference"
    if charge is not None:
        return None
    if intent.status in MOVING_INTENT:
        return (
            Kind.UNKNOWN_PAYMENT,
            f"intent {intent.status.value} ({intent.currency} {intent.amount}) for a payment we "
            "do not know",
        )
    return (
        Kind.ORPHAN_INTENT,
        f"intent {intent.status.value} for a payment we do not know: nothing moved",
    )


def _same_reference(charge: asyncpg.Record, intent: Intent) -> bool:
    return intent.reference is None or intent.reference == charge["reference"]


def _compare_charge(result: Reconciliation, charge: asyncpg.Record, intents: list[Intent]) -> None:
    payment_id, status = charge["payment_id"], charge["status"]
    confirmed = [i for i in intents if i.status.confirmed]
    succeeded = [i for i in intents if i.status == IntentStatus.SUCCEEDED]
    moving = [i for i in intents if i.status in MOVING_INTENT]
    if len(confirmed) > 1:
        result.add(
            Finding(
                Kind.SEVERAL_CONFIRMED_INTENTS,
                f"{len(confirmed)} intents confirmed for one payment: "
                + ", ".join(f"{i.id} {i.status.value}" for i in confirmed),
                payment_id=payment_id,
                intent_id=confirmed[0].id,
            )
        )
    for intent in intents:
        if not intent.status.confirmed:
            orphan = Finding(
                Kind.ORPHAN_INTENT,
                f"intent {intent.status.value} (payment {status}): nothing moved through it",
                payment_id=payment_id,
                intent_id=intent.id,
            )
            result.add(orphan)
            # Only the operation's recorded intent is ever confirmed: another one, still
            # unconfirmed, never will be by us.
            recorded = charge["intent_id"]
            if (
                intent.status == IntentStatus.REQUIRES_CONFIRMATION
                and recorded is not None
                and intent.id != recorded
            ):
                result.abandoned.append(orphan)
    if status == "PENDING":
        says = ", ".join(f"{i.id} {i.status.value}" for i in intents) or "no intent"
        result.add(
            Finding(
                Kind.UNDECIDED_PAYMENT,
                f"payment PENDING ({charge['phase']}); the gateway says: {says}",
                payment_id=payment_id,
                intent_id=charge["intent_id"],
            )
        )
        return
    if status in CHARGED_STATUSES:
        if not succeeded:
            says = ", ".join(f"{i.id} {i.status.value}" for i in intents) or "no intent"
            result.add(
                Finding(
                    Kind.CHARGED_WITHOUT_INTENT,
                    f"payment {status} without a succeeded intent; the gateway says: {says}",
                    payment_id=payment_id,
                    intent_id=charge["intent_id"],
                )
            )
        for intent in succeeded:
            if intent.amount != charge["amount"] or intent.currency != charge["currency"]:
                result.add(
                    Finding(
                        Kind.AMOUNT_MISMATCH,
                        f"payment {charge['currency']} {charge['amount']}, intent "
                        f"{intent.currency} {intent.amount}",
                        payment_id=payment_id,
                        intent_id=intent.id,
                    )
                )
        return
    for intent in moving:  # the payment is FAILED
        result.add(
            Finding(
                Kind.CHARGED_AT_GATEWAY,
                f"payment {status} but intent {intent.status.value} "
                f"({intent.currency} {intent.amount})",
                payment_id=payment_id,
                intent_id=intent.id,
            )
        )


async def _refunds(
    result: Reconciliation,
    conn: asyncpg.Connection,
    gateway: Gateway,
    refunds: dict[int, asyncpg.Record],
    gateway_refunds: Iterable[Refund],
    in_window: list[Refund],
) -> None:
    of_refund = _grouped(gateway_refunds, lambda refund: refund.refund_id)
    # The gateway's side: refunds in the window that none of ours made.
    strangers = [
        r
        for r in in_window
        if r.refund_id not in refunds or not _same_intent(refunds[r.refund_id], r)
    ]
    ours_intents = {
        row["intent_id"]
        for row in await conn.fetch(
            CHARGES_OF_INTENTS.sql,
            *CHARGES_OF_INTENTS.args(
                intent_ids=sorted({r.intent_id for r in strangers if r.intent_id is not None})
            ),
        )
    }
    for refund in strangers:
        ours = refund.intent_id in ours_intents
        if ours and refund.status in MOVING_REFUND:
            result.add(
                Finding(
                    Kind.UNKNOWN_REFUND,
                    f"gateway refund {refund.status.value} ({refund.currency} {refund.amount}) "
                    "that no refund of ours made",
                    payment_id=refund.payment_id,
                    refund_id=refund.refund_id,
                    intent_id=refund.intent_id,
                    gateway_refund_id=refund.id,
                )
            )
        elif not ours:
            result.add(
                Finding(
                    Kind.NOT_OURS,
                    "a refund of an intent we did not make",
                    intent_id=refund.intent_id,
                    gateway_refund_id=refund.id,
                )
            )
    # Our side: each refund against the gateway's.
    for refund_id, row in sorted(refunds.items()):
        listed = {i: r for i, r in of_refund.get(refund_id, {}).items() if _same_intent(row, r)}
        made = await _with_recorded(listed, row["gateway_refund_id"], gateway.retrieve_refund)
        await compare_again(result, _compare_refund, row, made, gateway.retrieve_refund)


def _same_intent(row: asyncpg.Record, refund: Refund) -> bool:
    """Whether a gateway refund naming our refund's id is of our refund's charge (another
    deployment sharing the gateway's account numbers its refunds from 1 too)."""
    return refund.intent_id is None or refund.intent_id == row["intent_id"]


def _compare_refund(result: Reconciliation, row: asyncpg.Record, made: list[Refund]) -> None:
    ids = {"payment_id": row["payment_id"], "refund_id": row["refund_id"]}
    status = row["status"]
    moving = [r for r in made if r.status in MOVING_REFUND]
    succeeded = [r for r in made if r.status == RefundStatus.SUCCEEDED]
    says = ", ".join(f"{r.id} {r.status.value}" for r in made) or "no refund"
    if len(moving) > 1:
        result.add(
            Finding(
                Kind.SEVERAL_REFUNDS,
                f"{len(moving)} gateway refunds for one refund: {says}",
                gateway_refund_id=moving[0].id,
                **ids,
            )
        )
    if status == "PENDING":
        result.add(
            Finding(Kind.UNDECIDED_REFUND, f"refund PENDING; the gateway says: {says}", **ids)
        )
    elif status == "REFUNDED":
        if not succeeded:
            result.add(
                Finding(
                    Kind.REFUND_MISSING_AT_GATEWAY,
                    f"refund REFUNDED without a succeeded gateway refund; the gateway says: {says}",
                    gateway_refund_id=row["gateway_refund_id"],
                    **ids,
                )
            )
        for refund in succeeded:
            if refund.amount != row["amount"] or refund.currency != row["currency"]:
                result.add(
                    Finding(
                        Kind.REFUND_AMOUNT_MISMATCH,
                        f"refund {row['currency']} {row['amount']}, gateway refund "
                        f"{refund.currency} {refund.amount}",
                        gateway_refund_id=refund.id,
                        **ids,
                    )
                )
    else:  # FAILED: the gateway refused it, as far as we know
        for refund in moving:
            result.add(
                Finding(
                    Kind.REFUNDED_AT_GATEWAY,
                    f"refund {status} but gateway refund {refund.status.value} "
                    f"({refund.currency} {refund.amount})",
                    gateway_refund_id=refund.id,
                    **ids,
                )
            )


# The differences a change between the gateway's listing and our read can make up: an intent
# listed PROCESSING that succeeded (or failed) and that we recorded so in between. Before one is
# recorded, the gateway's object it is about is asked for again and compared once more.
RECHECKED = frozenset(
    {Kind.CHARGED_WITHOUT_INTENT, Kind.CHARGED_AT_GATEWAY, Kind.REFUND_MISSING_AT_GATEWAY}
)


class _GatewayObject(Protocol):
    @property
    def id(self) -> str: ...


G = TypeVar("G", bound=_GatewayObject)


def _grouped(objects: Iterable[G], our_id: Callable[[G], int | None]) -> dict[int, dict[str, G]]:
    """The gateway's objects by the id of ours they name (those naming none left out), by id."""
    grouped: dict[int, dict[str, G]] = defaultdict(dict)
    for obj in objects:
        key = our_id(obj)
        if key is not None:
            grouped[key][obj.id] = obj
    return grouped


Row = Any  # one of our rows (an asyncpg.Record, or any mapping with its columns)


async def compare_again(
    result: Reconciliation,
    compare: Callable[[Reconciliation, Row, list[G]], None],
    row: Row,
    objects: list[G],
    retrieve: Callable[[str], Awaitable[G]],
) -> None:
    """`compare(result, row, objects)`, but a difference in RECHECKED is recorded only if it is
    still one against the gateway's state now: the object it names is asked for again (one call
    per suspected difference; our row was read after the listing, so what the gateway says now
    is at least as new as our row) and the comparison made once more."""
    first = Reconciliation(since=result.since, until=result.until)
    compare(first, row, objects)
    suspects = {
        finding.gateway_refund_id
        if finding.kind == Kind.REFUND_MISSING_AT_GATEWAY
        else finding.intent_id
        for finding in first.differences
        if finding.kind in RECHECKED
    } - {None}
    if not suspects:
        for finding in [*first.differences, *first.notes]:
            result.add(finding)
        result.abandoned.extend(first.abandoned)
        return
    fresh = {obj.id: obj for obj in objects}
    for object_id in sorted(str(suspect) for suspect in suspects):
        with contextlib.suppress(GatewayNotFound):
            fresh[object_id] = await retrieve(object_id)
    compare(result, row, list(fresh.values()))


async def _with_recorded(
    found: dict[str, G], recorded: str | None, retrieve: Callable[[str], Awaitable[G]]
) -> list[G]:
    """`found`, and the object whose id we recorded when the listing did not hold it (created
    outside the listed window): asked for by its id."""
    found = dict(found)
    if recorded is not None and recorded not in found:
        with contextlib.suppress(GatewayNotFound):
            found[recorded] = await retrieve(recorded)
    return list(found.values())


# -- scheduled runs (the relay's gateway worker) --------------------------------------------------
# The session advisory lock a scheduled run holds: one relay at a time runs a pass ("gwrecon").
RECONCILE_LOCK_ID = 0x67777265636F6E
# How far back before the last run's end a scheduled window starts: what was undecided then and
# decided just after, and objects created at the gateway a little late, are compared again.
OVERLAP = timedelta(minutes=10)


@dataclass(frozen=True)
class StoredReconciliation:
    """One scheduled run, as `gateway_reconciliations` keeps it (`report` None: not read)."""

    id: int
    started_at: datetime
    finished_at: datetime
    since: datetime
    until: datetime
    differences: int
    report: dict[str, Any] | None = None


_RUN_COLUMNS = "id, started_at, finished_at, since, until, differences"

# The relay reads the last run every minute and the console on every overview: the row without
# its report, which may be large.
LATEST = Statement(
    f"""
    SELECT {_RUN_COLUMNS}
      FROM gateway_reconciliations
     ORDER BY until DESC, id DESC
     LIMIT 1
    """
)

LATEST_WITH_REPORT = Statement(
    f"""
    SELECT {_RUN_COLUMNS}, report::text AS report
      FROM gateway_reconciliations
     ORDER BY until DESC, id DESC
     LIMIT 1
    """
)

INSERT_RUN = Statement(
    f"""
    INSERT INTO gateway_reconciliations
           (started_at, finished_at, since, until, differences, report)
    VALUES (:started_at, :finished_at, :since, :until, :differences, (:report::text)::jsonb)
    RETURNING {_RUN_COLUMNS}
    """
)


async def latest_reconciliation(
    conn: asyncpg.Connection, *, with_report: bool = False
) -> StoredReconciliation | None:
    """The last scheduled run (its `differences` is what the metric and the console show), with
    its report only if asked; None before the first."""
    row = await conn.fetchrow((LATEST_WITH_REPORT if with_report else LATEST).sql)
    if row is None:
        return None
    values = dict(row)
    if with_report:
        values["report"] = json.loads(values["report"])
    return StoredReconciliation(**values)


async def insert_reconciliation(
    conn: asyncpg.Connection, result: Reconciliation, *, started_at: datetime, finished_at: datetime
) -> StoredReconciliation:
    """Store a scheduled run with its whole report."""
    report = result.to_json()
    row = await conn.fetchrow(
        INSERT_RUN.sql,
        *INSERT_RUN.args(
            started_at=started_at,
            finished_at=finished_at,
            since=result.since,
            until=result.until,
            differences=len(result.differences),
            report=json.dumps(report),
        ),
    )
    assert row is not None
    return StoredReconciliation(**dict(row), report=report)


def seconds_until_due(
    latest: StoredReconciliation | None, *, now: datetime, interval_seconds: float
) -> float:
    """How long until the next scheduled run is due (0 or less: now) (pure)."""
    if latest is None:
        return 0.0
    return (latest.started_at + timedelta(seconds=interval_seconds) - now).total_seconds()


def next_window(
    latest: StoredReconciliation | None, *, now: datetime, interval_seconds: float
) -> tuple[datetime, datetime]:
    """The window of the next scheduled run (pure): from the last run's end less OVERLAP (the
    first run: one interval back) to now, at most MAX_WINDOW long."""
    since = (
        latest.until - OVERLAP if latest is not None else now - timedelta(seconds=interval_seconds)
    )
    return max(since, now - MAX_WINDOW), now
