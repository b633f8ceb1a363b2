"""The console's gateway part over HTTP: a payment's story with its operations and webhooks at the
gateway, found by a gateway id too; the review page with what the gateway says and the manual
decision (confirmed, CSRF-checked, settled through the settlement's core and audited as
`console:<key name>`); the overview's review queue and last reconciliation, first when they need
attention. The real app over HTTP against a real PostgreSQL; the operations flagged for review are
written as the gateway worker leaves them (the browser test flags one through the real gateway)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from payment_service.money.reconcile import latest_reconciliation
from tests.integration.conftest import ApiFactory
from tests.support.api import RunningApi, create_payment, post_json
from tests.support.audit import audit_rows
from tests.support.commands import run_to_end
from tests.support.console import CONSOLE, ConsoleClient, page_text, script_elements
from tests.support.environment import clean_env

TOKEN = "Zq3vR8xK1mWb7tYc0pLf5nHd2sGj9uAe-console-tests"
KEYS = (f"ops:{TOKEN}",)
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
INTENT = "pi_console_story_1"


@pytest.fixture
async def api(api_factory: ApiFactory) -> RunningApi:
    return await api_factory(admin_api_keys=KEYS)


@pytest.fixture
async def signed_in(api: RunningApi) -> ConsoleClient:
    client = ConsoleClient(api.new_client(follow_redirects=False))
    assert (await client.sign_in(TOKEN)).status_code == 303
    return client


async def flag_for_review(db: asyncpg.Connection, payment_id: int, intent_id: str) -> int:
    """The payment's charge as the gateway worker leaves it after GATEWAY_MAX_CHECKS unknown
    outcomes (phase REVIEW, the gateway's last error as it said it), and a webhook about it."""
    operation_id: int = await db.fetchval(
        """
        INSERT INTO gateway_operations
               (kind, payment_id, phase, key_hash, caller, intent_id, checks, unknown_checks,
                last_error)
        VALUES ('CHARGE', $1, 'REVIEW', repeat('a', 64), 'default', $2, 5, 5, $3)
        RETURNING operation_id
        """,
        payment_id,
        intent_id,
        "gateway: " + HOSTILE,
    )
    await db.execute(
        """
        INSERT INTO gateway_events (event_id, gateway_type, object_id, payment_id, outcome,
                                    created_at)
        VALUES ($1, $2, $3, $4, 'not_final', now())
        """,
        f"evt_{payment_id}",
        "payment_intent.processing" + HOSTILE,
        intent_id,
        payment_id,
    )
    return operation_id


async def test_a_payments_story_with_the_gateway_found_by_its_gateway_ids(
    api: RunningApi, signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    pending = await create_payment(api.client, method="UPI")
    await flag_for_review(db, pending["payment_id"], INTENT)
    card = await create_payment(api.client, method="CARD")
    refund = await post_json(
        api.client, f"/payments/{card['payment_id']}/refunds", {"idempotency_key": "gw-story"}
    )
    assert refund.status_code == 200, refund.text
    await db.execute(
        "UPDATE payment_refunds SET gateway_refund_id = 're_console_story_2' WHERE payment_id = $1",
        card["payment_id"],
    )

    for q, payment in ((INTENT, pending), ("re_console_story_2", card)):
        found = await signed_in.get("/payments", q=q)
        assert found.status_code == 303, q
        assert found.headers["location"] == CONSOLE + f"/payments/{payment['payment_id']}", q
    assert (await signed_in.get("/payments", q="pi_nobody_has_it")).status_code == 404

    page = await signed_in.get(f"/payments/{pending['payment_id']}")
    assert page.status_code == 200
    text = page_text(page.text)
    assert "charge #" in text and INTENT in text and "REVIEW" in text
    assert "5 (5 unknown)" in text, "its checks"
    assert "gateway: " + HOSTILE in text, "the gateway's error, as text"
    assert "payment_intent.processing" + HOSTILE in text and "not_final" in text, "its webhook"
    assert script_elements(page.text) == 0 and "<img" not in page.text
    plain = page_text((await signed_in.get(f"/payments/{card['payment_id']}")).text)
    assert "Not charged at a gateway." in plain and "re_console_story_2" in plain


async def test_the_review_page_and_a_manual_decision_audited(
    api: RunningApi, signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    pending = await create_payment(api.client, method="UPI", amount=Decimal("12.34"))
    payment_id = pending["payment_id"]
    operation_id = await flag_for_review(db, payment_id, INTENT)

    page = await signed_in.get("/gateway/review")
    assert page.status_code == 200
    text = page_text(page.text)
    assert "1 flagged for review" in text
    assert INTENT in text and "12.34" in text and "gateway: " + HOSTILE in text
    assert "not asked: no gateway is configured here" in text, "GATEWAY=none"
    assert script_elements(page.text) == 0 and "<img" not in page.text
    path = f"/gateway/review/{payment_id}/FAILED"
    assert f'href="{CONSOLE}{path}"' in page.text

    confirm = await signed_in.get(path)
    assert confirm.status_code == 200
    assert "Settle payment" in page_text(confirm.text) and INTENT in page_text(confirm.text)
    assert "gateway: " + HOSTILE in page_text(confirm.text), "the gateway's error, as text"
    assert script_elements(confirm.text) == 0 and "<img" not in confirm.text
    key = _field(confirm.text, "key")
    csrf = _field(confirm.text, "csrf")

    # Refused without the CSRF token, without a reason, with an unknown decision.
    assert (await signed_in.post(path, key=key, reason="x")).status_code == 403
    assert (await signed_in.post(path, csrf=csrf, key=key)).status_code == 400
    assert (
        await signed_in.post(f"/gateway/review/{payment_id}/MAYBE", csrf=csrf)
    ).status_code == 404
    assert await audit_rows(db, action="payment.settle") == []

    decided = await signed_in.post(path, csrf=csrf, key=key, reason="bank says " + HOSTILE)
    assert decided.status_code == 303, decided.text
    assert decided.headers["location"] == CONSOLE + f"/gateway/review?decided={payment_id}"
    row = await db.fetchrow(
        "SELECT status, failure_code, failure_message FROM payments WHERE payment_id = $1",
        payment_id,
    )
    assert tuple(row) == ("FAILED", "manual_settlement", "bank says " + HOSTILE)
    phase = await db.fetchval(
        "SELECT phase FROM gateway_operations WHERE operation_id = $1", operation_id
    )
    assert phase == "DONE"
    # The same form sent again (a double click) replays: nothing more is recorded.
    again = await signed_in.post(path, csrf=csrf, key=key, reason="bank says " + HOSTILE)
    assert again.status_code == 303
    (entry,) = await audit_rows(db, action="payment.settle")
    assert (entry["actor"], entry["target_kind"], entry["target_id"]) == (
        "console:ops",
        "payment",
        str(payment_id),
    )
    assert entry["origin"] == "127.0.0.1"
    assert entry["before"] == '{"status": "PENDING"}' and entry["after"] == '{"status": "FAILED"}'
    assert entry["reason"] == "bank says " + HOSTILE
    # A second decision on it is refused, and says why.
    succeed = f"/gateway/review/{payment_id}/SUCCESS"
    form = (await signed_in.get(succeed)).text
    assert "It is FAILED already" in page_text(form)
    refused = await signed_in.post(
        succeed, csrf=_field(form, "csrf"), key=_field(form, "key"), reason="no"
    )
    assert refused.status_code == 409 and "is FAILED" in page_text(refused.text)

    after = page_text((await signed_in.get("/gateway/review", decided=str(payment_id))).text)
    assert "0 flagged for review" in after and "Nothing is flagged for review." in after
    assert f"Payment {payment_id} is decided" in after
    audit_page = await signed_in.get("/audit", target=f"payment:{payment_id}")
    assert "payment.settle" in page_text(audit_page.text)


async def test_no_decision_while_a_call_to_the_gateway_is_in_flight(
    api: RunningApi,
    signed_in: ConsoleClient,
    db: asyncpg.Connection,
    database_url: str,
    tmp_path: Path,
) -> None:
    """A charge STARTED under a live lease (its call to the gateway may be in flight): the
    console's decision is refused 409 and `gateway settle` exits 1, both saying why, and nothing is
    recorded; once the lease has run out, the decision goes through."""
    pending = await create_payment(api.client, method="UPI")
    payment_id = pending["payment_id"]
    await db.execute(
        """
        INSERT INTO gateway_operations
               (kind, payment_id, phase, key_hash, caller, intent_id, locked_until, claim_token)
        VALUES ('CHARGE', $1, 'STARTED', repeat('a', 64), 'default', $2,
                now() + interval '10 minutes', gen_random_uuid())
        """,
        payment_id,
        INTENT,
    )
    path = f"/gateway/review/{payment_id}/FAILED"
    form = (await signed_in.get(path)).text
    fields = {"csrf": _field(form, "csrf"), "key": _field(form, "key"), "reason": "no answer"}

    refused = await signed_in.post(path, **fields)
    assert refused.status_code == 409
    assert "is being charged at the gateway right now" in page_text(refused.text)
    cli = await asyncio.to_thread(
        run_to_end,
        ["gateway", "settle", str(payment_id), "FAILED", "--reason", "no answer"],
        clean_env(DATABASE_URL=database_url),
        tmp_path,
    )
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "is being charged at the gateway right now" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1
    assert (
        await db.fetchval("SELECT status FROM payments WHERE payment_id = $1", payment_id)
        == "PENDING"
    )
    assert await audit_rows(db, action="payment.settle") == []

    # The lease ran out (its holder died): the operator may decide now.
    await db.execute(
        "UPDATE gateway_operations SET locked_until = now() - interval '1 second'"
        " WHERE payment_id = $1",
        payment_id,
    )
    decided = await signed_in.post(path, **fields)
    assert decided.status_code == 303, decided.text
    assert (
        await db.fetchval("SELECT status FROM payments WHERE payment_id = $1", payment_id)
        == "FAILED"
    )


def _field(html: str, name: str) -> str:
    marker = f'name="{name}" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


async def test_the_review_page_pages_by_operation(
    api: RunningApi, signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    flagged = []
    for n in range(23):
        payment = await create_payment(api.client, method="UPI")
        flagged.append(await flag_for_review(db, payment["payment_id"], f"pi_page_{n}"))
    first = await signed_in.get("/gateway/review")
    assert "23 flagged for review" in page_text(first.text)
    assert first.text.count('id="flagged-') == 20
    later = CONSOLE + f"/gateway/review?after={flagged[19]}"
    assert f'href="{later}"' in first.text.replace("&amp;", "&")
    rest = await signed_in.get(f"/gateway/review?after={flagged[19]}")
    assert [f'id="flagged-{op}"' in rest.text for op in flagged[20:]] == [True] * 3
    assert rest.text.count('id="flagged-') == 3 and 'id="later"' not in rest.text


async def test_the_overview_puts_the_gateway_first_when_it_needs_attention(
    api: RunningApi, signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    def order(html: str) -> list[str]:
        return sorted(("gateway", "endpoints"), key=lambda t: html.index(f'id="{t}"'))

    quiet = await signed_in.get("/")
    text = page_text(quiet.text)
    assert "never run" in text and "gateway needs attention" not in text
    assert order(quiet.text) == ["endpoints", "gateway"]
    assert await latest_reconciliation(db) is None

    payment = await create_payment(api.client, method="UPI")
    await flag_for_review(db, payment["payment_id"], INTENT)
    flagged = await signed_in.get("/")
    assert order(flagged.text) == ["gateway", "endpoints"]
    assert "1 charge or refund flagged for review" in page_text(flagged.text)

    # Two stored runs of the scheduled reconciliation, the later one with differences.
    await db.execute(
        """
        INSERT INTO gateway_reconciliations
               (started_at, finished_at, since, until, differences, report)
        VALUES (now(), now(), now() - interval '2 hours', now() - interval '1 hour', 0, '{}'),
               (now(), now(), now() - interval '1 hour', now(), 3, '{}');
        """
    )
    last: Any = await latest_reconciliation(db)
    assert last is not None and last.differences == 3, "the latest finished run"
    both = page_text((await signed_in.get("/")).text)
    assert "1 charge or refund flagged for review; 3 differences in the last reconciliation" in both
    assert "never run" not in both
