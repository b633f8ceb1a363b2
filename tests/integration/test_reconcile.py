"""`payment-service reconcile` against a real localstripe process and a real PostgreSQL: what the
API writes through the gateway reconciles (exit 0); a difference made directly, in our database
or at the gateway, exits 1 and is named; notes are not differences; bad times and a missing
gateway are one-line usage errors (exit 2).

The module has a gateway of its own (not the session's, which other tests' databases share):
everything it holds was made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from outbox_relay.metrics import RelayMetrics
from outbox_relay.reconciler import RETRY_SECONDS, Reconciler
from outbox_relay.state import RelayState
from payment_service.database import create_pool
from payment_service.embedded import free_port
from payment_service.gateway.embedded import EMBEDDED_API_KEY, EmbeddedGateway
from payment_service.gateway.interface import ChargeRequest
from payment_service.money.reconcile import OVERLAP, latest_reconciliation
from tests.integration.test_check import cloned_database
from tests.integration.test_check_gateway import fill_through_the_gateway
from tests.support.api import new_trip
from tests.support.commands import Finished, run_to_end
from tests.support.environment import clean_env
from tests.support.gateway import AUTH, gateway_adapter, relay_settings


@pytest.fixture(scope="module")
def own_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedGateway]:
    gateway = EmbeddedGateway(log_path=tmp_path_factory.mktemp("reconcile") / "localstripe.log")
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
async def filled(
    postgres_server: Any, template_database: str, own_gateway: EmbeddedGateway
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(database name, ids): a charge, a decline, a partly refunded charge and a charge staged by
    an API that died (PENDING), made through the API at the module's gateway; `since` is a little
    before the first."""
    async with cloned_database(postgres_server, template_database, "reconcile_source") as name:
        since = datetime.now(UTC) - timedelta(seconds=2)
        ids = await fill_through_the_gateway(postgres_server.dsn(name), own_gateway)
        yield name, {**ids, "since": since}


@dataclass
class Case:
    """One test's copy of the filled database, the module's gateway, and what `reconcile` runs
    in."""

    url: str
    conn: asyncpg.Connection
    ids: dict[str, Any]
    gateway: EmbeddedGateway
    cwd: Path

    async def reconciled(self) -> tuple[int, dict[str, Any]]:
        return await reconciled(self.url, self.gateway, self.cwd, self.ids["since"])

    async def text(self) -> Finished:
        since = self.ids["since"].isoformat()
        return await asyncio.to_thread(
            reconcile, self.url, self.gateway, self.cwd, "--since", since
        )


@pytest.fixture
async def case(
    postgres_server: Any,
    filled: tuple[str, dict[str, Any]],
    own_gateway: EmbeddedGateway,
    tmp_path: Path,
) -> AsyncIterator[Case]:
    """A copy of the filled database for one test to change."""
    async with cloned_database(postgres_server, filled[0], "reconcile_copy") as name:
        conn = await asyncpg.connect(postgres_server.dsn(name))
        try:
            yield Case(postgres_server.dsn(name), conn, filled[1], own_gateway, tmp_path)
        finally:
            await conn.close()


def reconcile(
    database_url: str, gateway: EmbeddedGateway | None, cwd: Path, *args: str
) -> Finished:
    settings: dict[str, str] = (
        {
            "GATEWAY": "stripe",
            "STRIPE_SECRET_KEY": EMBEDDED_API_KEY,
            "STRIPE_API_BASE": gateway.base_url,
            "STRIPE_API_FLAVOUR": "localstripe",
        }
        if gateway is not None
        else {"GATEWAY": "none"}
    )
    return run_to_end(["reconcile", *args], clean_env(DATABASE_URL=database_url, **settings), cwd)


async def reconciled(
    database_url: str, gateway: EmbeddedGateway, cwd: Path, since: datetime
) -> tuple[int, dict[str, Any]]:
    """`reconcile --since SINCE --json`: its exit code and report."""
    result = await asyncio.to_thread(
        reconcile, database_url, gateway, cwd, "--since", since.isoformat(), "--json"
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


async def test_what_the_api_charged_reconciles(
    case: Case,
) -> None:
    ids = case.ids
    text = await case.text()
    assert text.returncode == 0, text.stdout + text.stderr
    assert text.stdout.splitlines()[-1] == "no difference"
    assert "4 charges and 1 refunds of ours, 3 intents and 1 refunds at the gateway" in text.stdout

    code, report = await case.reconciled()
    assert code == 0
    assert report["consistent"] is True
    assert report["differences"] == []
    assert report["compared"] == {"payments": 4, "refunds": 1, "intents": 3, "gateway_refunds": 1}
    # The charge staged by the API that died is undecided: a note, not a difference.
    assert [(n["kind"], n["payment_id"]) for n in report["notes"]] == [
        ("undecided_payment", ids["staged"])
    ]
    assert set(report) == {"since", "until", "consistent", "compared", "differences", "notes"}
    assert datetime.fromisoformat(report["since"]) == ids["since"]


async def test_an_intent_that_charged_a_payment_we_hold_failed_is_a_difference(
    case: Case,
) -> None:
    ids = case.ids
    await case.conn.execute(
        "UPDATE payments SET status = 'FAILED' WHERE payment_id = $1", ids["charged"]
    )
    code, report = await case.reconciled()
    assert code == 1
    (difference,) = report["differences"]
    assert (difference["kind"], difference["payment_id"]) == ("charged_at_gateway", ids["charged"])
    assert difference["intent_id"].startswith("pi_")

    text = await case.text()
    assert text.returncode == 1
    assert f"difference: charged_at_gateway (payment {ids['charged']}, intent pi_" in text.stdout
    assert text.stdout.splitlines()[-1] == "1 difference(s)"


DIFFERENCES_IN_SQL: list[tuple[str, str, str, str]] = [
    (
        "a payment charged here whose intent failed at the gateway",
        "UPDATE payments SET status = 'SUCCESS' WHERE payment_id = $1",
        "declined",
        "charged_without_intent",
    ),
    (
        "a payment's amount changed after it was charged",
        "UPDATE payments SET amount = amount + 1 WHERE payment_id = $1",
        "charged",
        "amount_mismatch",
    ),
    (
        "a refund's amount changed after it was refunded",
        "UPDATE payment_refunds SET amount = amount + 1 WHERE refund_id = $1",
        "refund",
        "refund_amount_mismatch",
    ),
    (
        "a refund refused here that the gateway made",
        "UPDATE payment_refunds SET status = 'FAILED' WHERE refund_id = $1",
        "refund",
        "refunded_at_gateway",
    ),
]


@pytest.mark.parametrize(
    ("sql", "target", "kind"),
    [pytest.param(sql, target, kind, id=case) for case, sql, target, kind in DIFFERENCES_IN_SQL],
)
async def test_each_difference_made_in_our_database_is_named(
    case: Case,
    sql: str,
    target: str,
    kind: str,
) -> None:
    ids = case.ids
    await case.conn.execute(sql, ids[target])
    code, report = await case.reconciled()
    assert code == 1
    (difference,) = report["differences"]
    assert difference["kind"] == kind
    assert ids[target] in (difference["payment_id"], difference["refund_id"])


async def test_a_refund_row_without_a_gateway_refund_is_a_difference(
    case: Case,
) -> None:
    ids = case.ids
    refund_id = await case.conn.fetchval(
        """
        WITH refund AS (
            INSERT INTO payment_refunds (payment_id, amount, status, idempotency_hash)
            VALUES ($1, 5, 'REFUNDED', repeat('a', 64))
         RETURNING refund_id, payment_id
        )
        INSERT INTO gateway_operations
               (kind, payment_id, refund_id, intent_id, key_hash, caller, phase)
        SELECT 'REFUND', refund.payment_id, refund.refund_id, o.intent_id, repeat('a', 64),
               'default', 'DONE'
          FROM refund
          JOIN gateway_operations AS o ON o.payment_id = refund.payment_id AND o.kind = 'CHARGE'
        RETURNING refund_id
        """,
        ids["refunded"],
    )
    code, report = await case.reconciled()
    assert code == 1
    (difference,) = report["differences"]
    assert (difference["kind"], difference["refund_id"]) == ("refund_missing_at_gateway", refund_id)


async def test_intents_at_the_gateway_for_payments_we_do_not_hold(
    database_url: str, tmp_path: Path
) -> None:
    """A confirmed intent for a payment we do not know is a difference; one never confirmed
    is a note (a crash between creating and confirming leaves one), and so are objects the
    service did not make."""
    gateway = EmbeddedGateway(log_path=tmp_path / "localstripe.log")
    gateway.start()
    try:
        since = datetime.now(UTC) - timedelta(seconds=2)
        adapter = gateway_adapter(gateway.base_url)
        try:
            charged, created = [
                await adapter.create_intent(
                    ChargeRequest(
                        payment_id=payment_id,
                        trip_id=new_trip(),
                        reference=f"PAY-20260101-{payment_id:08x}",
                        amount=Decimal("12.50"),
                        currency="INR",
                        method="CARD",
                        payment_method="pm_card_visa",
                    )
                )
                for payment_id in (987_654_321, 987_654_322)
            ]
            await adapter.confirm(charged.id, payment_id=987_654_321, saved_method=False)
        finally:
            await adapter.close()

        code, report = await reconciled(database_url, gateway, tmp_path, since)
    finally:
        gateway.stop()
    assert code == 1
    assert [(d["kind"], d["intent_id"]) for d in report["differences"]] == [
        ("unknown_payment", charged.id)
    ]
    assert [(n["kind"], n["intent_id"]) for n in report["notes"]] == [("orphan_intent", created.id)]


BAD_TIMES: list[tuple[list[str], str]] = [
    (["--since", "yesterday"], "is not an ISO-8601 time"),
    (["--since", "2026-01-31T00:00:00"], "has no timezone"),
    (["--since", "2026-02-30T00:00:00Z"], "is not an ISO-8601 time"),
    (["--since", "9999-12-31T23:59:59Z"], "is not in the past"),
    (["--since", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"], "must be after"),
    (["--since", "2000-01-01T00:00:00Z"], "longer than 366 days"),
    (["--since", "2026-01-01T00:00:00\x1b[31mZ"], "\\x1b[31m"),
]


@pytest.mark.parametrize(("args", "message"), BAD_TIMES)
def test_a_bad_time_is_one_line_and_exit_2(
    database_url: str, tmp_path: Path, args: list[str], message: str
) -> None:
    result = reconcile(database_url, None, tmp_path, *args)
    assert result.returncode == 2
    (line,) = result.error_lines
    assert line.startswith("payment-service: ") and message in line, line
    assert "\x1b" not in result.stderr
    assert result.stdout == ""


def test_without_a_gateway_it_is_one_line_and_exit_2(database_url: str, tmp_path: Path) -> None:
    yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    result = reconcile(database_url, None, tmp_path, "--since", yesterday)
    assert result.returncode == 2
    assert result.error_lines == [
        "payment-service: no gateway is configured (GATEWAY=none): there is nothing to "
        "reconcile with"
    ]


# -- the relay's scheduled reconciliation ---------------------------------------------------------
@contextlib.asynccontextmanager
async def reconciler(case: Case, **overrides: Any) -> AsyncIterator[Reconciler]:
    """A relay's scheduled reconciliation against the case's database and gateway (its pool and
    adapter closed at the end)."""
    settings = relay_settings(case.url, case.gateway.base_url, **overrides)
    state = RelayState(settings, RelayMetrics())
    state.pool = await create_pool(case.url, min_size=0, max_size=2)
    adapter = gateway_adapter(case.gateway.base_url)
    try:
        yield Reconciler(state, adapter)
    finally:
        await adapter.close()
        await state.pool.close()


def differences_gauge(reconciler: Reconciler) -> float:
    value = reconciler.state.metrics.registry.get_sample_value("gateway_reconciliation_differences")
    assert value is not None
    return value


async def test_a_scheduled_run_is_stored_with_its_differences_and_shown_as_a_metric(
    case: Case,
) -> None:
    await case.conn.execute(
        "UPDATE payments SET status = 'FAILED' WHERE payment_id = $1", case.ids["charged"]
    )
    async with reconciler(case, gateway_reconcile_interval=3600) as scheduled:
        assert await scheduled.attempt() == 3600
        assert differences_gauge(scheduled) == 1
        # Not due again before the interval: nothing more is stored.
        assert 0 < await scheduled.attempt() <= 3600
    (run,) = await case.conn.fetch("SELECT * FROM gateway_reconciliations")
    assert run["differences"] == 1
    assert run["started_at"] <= run["finished_at"]
    assert run["until"] - run["since"] == timedelta(seconds=3600)  # the first: one interval back
    (difference,) = json.loads(run["report"])["differences"]
    assert (difference["kind"], difference["payment_id"]) == (
        "charged_at_gateway",
        case.ids["charged"],
    )

    # What the relay's gauge and the console's overview read: the row, not its report.
    latest = await latest_reconciliation(case.conn)
    assert latest is not None and (latest.id, latest.differences) == (run["id"], 1)
    assert latest.report is None
    whole = await latest_reconciliation(case.conn, with_report=True)
    assert whole is not None and whole.report == json.loads(run["report"])


async def test_the_next_run_starts_where_the_last_ended_with_an_overlap(case: Case) -> None:
    async with reconciler(case, gateway_reconcile_interval=3600) as scheduled:
        await scheduled.attempt()
        await case.conn.execute(
            "UPDATE gateway_reconciliations SET started_at = started_at - '2 hours'::interval"
        )
        await scheduled.attempt()
        assert differences_gauge(scheduled) == 0
    first, second = await case.conn.fetch("SELECT * FROM gateway_reconciliations ORDER BY id")
    assert second["since"] == first["until"] - OVERLAP
    assert (first["differences"], second["differences"]) == (0, 0)


async def test_one_relay_runs_a_scheduled_pass(case: Case) -> None:
    async with (
        reconciler(case, gateway_reconcile_interval=3600) as one,
        reconciler(case, gateway_reconcile_interval=3600) as other,
    ):
        await asyncio.gather(one.attempt(), other.attempt(), one.attempt(), other.attempt())
        assert one.runs + other.runs == 1
        # The relay that did not run it shows the stored run's count as well.
        assert differences_gauge(one) == differences_gauge(other) == 0
    assert await case.conn.fetchval("SELECT count(*) FROM gateway_reconciliations") == 1


async def test_a_run_the_gateway_cuts_short_is_not_stored(case: Case, tmp_path: Path) -> None:
    async with reconciler(case, gateway_reconcile_interval=3600) as scheduled:
        scheduled.gateway = gateway_adapter(f"http://127.0.0.1:{free_port()}")  # nobody there
        try:
            assert await scheduled.attempt() == RETRY_SECONDS
            # Not tried again before RETRY_SECONDS, however often the loop looks.
            assert 0 < await scheduled.attempt() <= RETRY_SECONDS
            assert scheduled.runs == 0
        finally:
            await scheduled.gateway.close()
    assert await case.conn.fetchval("SELECT count(*) FROM gateway_reconciliations") == 0


async def test_a_long_window_shows_its_progress_on_stderr(case: Case) -> None:
    since = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    result = await asyncio.to_thread(
        reconcile, case.url, case.gateway, case.cwd, "--since", since, "--json"
    )
    assert result.returncode == 0, result.stderr
    progress = result.error_lines
    assert progress[0] == "payment-service: listing the gateway, day 1 of 4"
    assert progress[3] == "payment-service: listing the gateway, day 4 of 4"
    assert progress[-1] == "payment-service: comparing 4 charges and 1 refunds with the gateway's"
    assert json.loads(result.stdout)["consistent"] is True


def test_a_gateway_that_does_not_answer_is_exit_3(database_url: str, tmp_path: Path) -> None:
    nobody = EmbeddedGateway(port=free_port())  # never started: nothing listens there
    since = (datetime.now(UTC) - timedelta(hours=12)).isoformat()
    result = reconcile(database_url, nobody, tmp_path, "--since", since)
    assert result.returncode == 3, result.stderr
    assert result.error_lines == [
        "payment-service: the gateway did not answer (connection): nothing was compared"
    ]
    assert result.stdout == ""


@contextlib.asynccontextmanager
async def filled_gateway(database_url: str, tmp_path: Path) -> AsyncIterator[Case]:
    """A gateway of the test's own, and the test's database filled through the API at it (for a
    test that changes the gateway: the module's is shared)."""
    gateway = EmbeddedGateway(log_path=tmp_path / "localstripe.log")
    gateway.start()
    try:
        since = datetime.now(UTC) - timedelta(seconds=2)
        ids = await fill_through_the_gateway(database_url, gateway)
        conn = await asyncpg.connect(database_url)
        try:
            yield Case(database_url, conn, {**ids, "since": since}, gateway, tmp_path)
        finally:
            await conn.close()
    finally:
        gateway.stop()


async def test_a_refund_made_at_the_gateway_outside_the_service_is_a_difference(
    database_url: str, tmp_path: Path
) -> None:
    async with filled_gateway(database_url, tmp_path) as case:
        intent_id = await case.conn.fetchval(
            "SELECT gateway_reference FROM payments WHERE payment_id = $1", case.ids["charged"]
        )
        # Someone refunds 10.00 of the charge in the gateway's dashboard.
        async with httpx.AsyncClient(base_url=case.gateway.base_url, headers=AUTH) as client:
            made = await client.post(
                "/v1/refunds", data={"payment_intent": intent_id, "amount": "1000"}
            )
        assert made.status_code == 200, made.text
        code, report = await case.reconciled()
    assert code == 1
    assert [(d["kind"], d["intent_id"], d["gateway_refund_id"]) for d in report["differences"]] == [
        ("unknown_refund", intent_id, made.json()["id"])
    ]


async def confirmed_intent(case: Case, **metadata: str) -> str:
    """An intent of 1.00 made and confirmed at the case's gateway directly, with `metadata`."""
    async with httpx.AsyncClient(base_url=case.gateway.base_url, headers=AUTH) as client:
        created = await client.post(
            "/v1/payment_intents",
            data={
                "amount": "100",
                "currency": "inr",
                "payment_method": "pm_card_visa",
                **{f"metadata[{name}]": value for name, value in metadata.items()},
            },
        )
        intent_id = str(created.json()["id"])
        confirmed = await client.post(f"/v1/payment_intents/{intent_id}/confirm")
    assert confirmed.json()["status"] == "succeeded", confirmed.text
    return intent_id


async def test_another_deployments_intent_with_one_of_our_ids_is_a_note(
    database_url: str, tmp_path: Path
) -> None:
    async with filled_gateway(database_url, tmp_path) as case:
        theirs = await confirmed_intent(
            case, payment_id=str(case.ids["charged"]), reference="PAY-20260101-0000abcd"
        )
        code, report = await case.reconciled()
    assert code == 0, report["differences"]
    assert ("not_ours", theirs) in {(n["kind"], n["intent_id"]) for n in report["notes"]}


async def test_a_payment_confirmed_twice_at_the_gateway_is_a_difference(
    database_url: str, tmp_path: Path
) -> None:
    async with filled_gateway(database_url, tmp_path) as case:
        payment = await case.conn.fetchrow(
            "SELECT payment_id, reference FROM payments WHERE payment_id = $1",
            case.ids["charged"],
        )
        # A second intent of the same payment, confirmed: charged twice.
        await confirmed_intent(
            case, payment_id=str(payment["payment_id"]), reference=payment["reference"]
        )
        code, report = await case.reconciled()
    assert code == 1
    kinds = {(d["kind"], d["payment_id"]) for d in report["differences"]}
    assert ("several_confirmed_intents", payment["payment_id"]) in kinds
    # Its amount is not the payment's either.
    assert kinds == {
        ("several_confirmed_intents", payment["payment_id"]),
        ("amount_mismatch", payment["payment_id"]),
    }


async def test_a_payment_settled_after_its_window_is_compared_at_the_next_scheduled_run(
    case: Case,
) -> None:
    """Pending at one run (a note), settled FAILED by hand later while the gateway charged it: the
    next scheduled run, whose window neither stages it nor lists its intent, still compares it."""
    staged = case.ids["staged"]
    reference = await case.conn.fetchval(
        "SELECT reference FROM payments WHERE payment_id = $1", staged
    )
    intent_id = await confirmed_intent(case, payment_id=str(staged), reference=reference)
    await case.conn.execute(
        "UPDATE gateway_operations SET intent_id = $2 WHERE payment_id = $1", staged, intent_id
    )
    async with reconciler(case, gateway_reconcile_interval=3600) as scheduled:
        await scheduled.attempt()
        (first,) = await case.conn.fetch("SELECT * FROM gateway_reconciliations")
        notes = json.loads(first["report"])["notes"]
        assert ("undecided_payment", staged) in {(n["kind"], n["payment_id"]) for n in notes}
        assert first["differences"] == 0

        # Its call's lease ran out; hours later an operator settles it FAILED.
        await case.conn.execute(
            "UPDATE gateway_operations SET locked_until = now() - interval '1 second' "
            "WHERE payment_id = $1",
            staged,
        )
        settled = await asyncio.to_thread(
            run_to_end,
            ["gateway", "settle", str(staged), "FAILED", "--reason", "no answer from the bank"],
            clean_env(DATABASE_URL=case.url),
            case.cwd,
        )
        assert settled.returncode == 0, settled.stderr

        # The next run's window: two hours after the first one's, which the payment and its
        # intent (made a moment ago) both precede by far.
        await case.conn.execute(
            "UPDATE gateway_reconciliations SET until = until - interval '3 hours', "
            "since = since - interval '3 hours', started_at = started_at - interval '3 hours', "
            "finished_at = finished_at - interval '3 hours'"
        )
        latest = await latest_reconciliation(case.conn)
        now = datetime.now(UTC) - timedelta(hours=1)
        conn = await asyncpg.connect(case.url)
        try:
            second = await scheduled._pass(conn, latest, now)
        finally:
            await conn.close()
    assert second.since == first["until"] - timedelta(hours=3) - OVERLAP
    assert second.until == now
    assert second.report is not None
    assert [(d["kind"], d["payment_id"], d["intent_id"]) for d in second.report["differences"]] == [
        ("charged_at_gateway", staged, intent_id)
    ]


async def unconfirmed_intent(case: Case, payment_id: int) -> str:
    """An intent made at the case's gateway for one of our payments (its reference too), never
    confirmed: what a create whose answer was lost leaves behind."""
    reference = await case.conn.fetchval(
        "SELECT reference FROM payments WHERE payment_id = $1", payment_id
    )
    async with httpx.AsyncClient(base_url=case.gateway.base_url, headers=AUTH) as client:
        created = await client.post(
            "/v1/payment_intents",
            data={
                "amount": "100",
                "currency": "inr",
                "payment_method": "pm_card_visa",
                "metadata[payment_id]": str(payment_id),
                "metadata[reference]": reference,
            },
        )
    assert created.json()["status"] == "requires_confirmation", created.text
    return str(created.json()["id"])


async def intent_status(case: Case, intent_id: str) -> str:
    async with httpx.AsyncClient(base_url=case.gateway.base_url, headers=AUTH) as client:
        return str((await client.get(f"/v1/payment_intents/{intent_id}")).json()["status"])


async def test_a_scheduled_run_cancels_the_orphans_nothing_of_ours_will_confirm(
    case: Case,
) -> None:
    """An unconfirmed intent of a payment whose operation recorded another is canceled at the
    gateway by the scheduled run; one of a payment with no recorded intent yet (its call may
    still record it) is left alone, and a run by hand cancels nothing."""
    charged, staged = case.ids["charged"], case.ids["staged"]
    assert (
        await case.conn.fetchval(
            "SELECT intent_id FROM gateway_operations WHERE payment_id = $1", staged
        )
        is None
    )
    recorded = await case.conn.fetchval(
        "SELECT intent_id FROM gateway_operations WHERE payment_id = $1", charged
    )
    abandoned = await unconfirmed_intent(case, charged)
    maybe_recorded = await unconfirmed_intent(case, staged)

    code, report = await case.reconciled()  # by hand: listed, nothing canceled
    assert code == 0, report
    orphans = {n["intent_id"] for n in report["notes"] if n["kind"] == "orphan_intent"}
    assert {abandoned, maybe_recorded} <= orphans
    assert await intent_status(case, abandoned) == "requires_confirmation"

    async with reconciler(case, gateway_reconcile_interval=3600) as scheduled:
        await scheduled.attempt()
        assert scheduled.runs == 1 and scheduled.canceled == 1
        assert differences_gauge(scheduled) == 0
    assert await intent_status(case, abandoned) == "canceled"
    assert await intent_status(case, maybe_recorded) == "requires_confirmation"
    assert await intent_status(case, recorded) == "succeeded"
    code, _ = await case.reconciled()
    assert code == 0
