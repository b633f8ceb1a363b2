"""Money moves at a real gateway (the embedded localstripe on 127.0.0.1), exactly once.

Charges and refunds through the API in phases: staged, made at the gateway, written with their
event and the idempotency key's answer; 200 SUCCESS or FAILED, 202 PENDING when undecided. The
gateway's signed webhooks settle what was undecided, forward only; the gateway worker (run in the
test's event loop) finishes what the API left. After every test that moves money the gateway's
own ledger is read (`read_ledger`, the tests' own client): what it holds, not only what the
service says. Faults come from the fault proxy, in front of the gateway or of our webhook URL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from payment_cli.check import check_database
from payment_service.gateway.embedded import EMBEDDED_API_KEY, EmbeddedGateway
from tests.integration.conftest import ApiFactory
from tests.support.api import (
    ADMIN_KEYS,
    RunningApi,
    assert_problem,
    assert_replay,
    exact_json,
    new_key,
    payment_body,
    post_json,
    settle,
)
from tests.support.commands import run_to_end
from tests.support.database import outbox_rows
from tests.support.environment import clean_env
from tests.support.fault_proxy import (
    DROP_AFTER_FORWARD,
    HANG,
    FaultProxy,
    answer,
    delay,
    matching,
    repeat,
)
from tests.support.gateway import (
    CARD_3DS,
    CARD_DECLINED,
    IBAN_FAILING,
    GatewayLedger,
    gateway_settings,
    intent_json,
    make_payment_method,
    read_ledger,
    register_webhook,
    running_worker,
    signed_event,
)
from tests.support.waiting import wait_for

WEBHOOK_PATH = "/gateway/stripe/webhook"
CREATE = matching("POST", "/v1/payment_intents")
CONFIRM = matching("POST", r"/v1/payment_intents/\w+/confirm")
REFUND = matching("POST", "/v1/refunds")
ProxyFactory = Callable[[str], Any]


# -- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture
async def charging(api_factory: ApiFactory, embedded_gateway: EmbeddedGateway) -> RunningApi:
    """An API that charges at the embedded gateway (and has the tests' admin key)."""
    return await api_factory(
        **gateway_settings(embedded_gateway.base_url), admin_api_keys=ADMIN_KEYS
    )


@pytest.fixture
async def proxy(embedded_gateway: EmbeddedGateway, proxy_factory: ProxyFactory) -> FaultProxy:
    """A fault proxy in front of the embedded gateway."""
    started: FaultProxy = await proxy_factory(embedded_gateway.base_url)
    return started


@pytest.fixture
async def behind_proxy(api_factory: ApiFactory, proxy: FaultProxy) -> RunningApi:
    """An API that charges at the embedded gateway through the fault proxy, with a short
    time-out (a call the proxy holds is an unknown outcome after 1 s)."""
    return await api_factory(
        **gateway_settings(proxy.base_url, gateway_timeout_seconds=1), admin_api_keys=ADMIN_KEYS
    )


async def ledger_of(gateway: EmbeddedGateway, payment: dict[str, Any]) -> GatewayLedger:
    """What the gateway holds for this payment (found by its reference)."""
    return (await read_ledger(gateway.base_url)).of_reference(payment["reference"])


async def pay(api: RunningApi, expected: int = 200, **fields: Any) -> dict[str, Any]:
    response = await post_json(api.client, "/payments", payment_body(**fields))
    assert response.status_code == expected, response.text
    return dict(exact_json(response))


async def refund(
    api: RunningApi, payment_id: int, amount: str | None = None, key: str | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"idempotency_key": key or new_key("refund")}
    if amount is not None:
        body["amount"] = Decimal(amount)
    return await post_json(api.client, f"/payments/{payment_id}/refunds", body)


async def events_of(db: asyncpg.Connection, payment_id: int) -> list[tuple[str, int]]:
    return [(e["event_type"], e["payload"]["sequence"]) for e in await outbox_rows(db, payment_id)]


async def operation(db: asyncpg.Connection, payment_id: int, kind: str = "CHARGE") -> Any:
    return await db.fetchrow(
        "SELECT * FROM gateway_operations WHERE payment_id = $1 AND kind = $2 "
        "ORDER BY operation_id DESC LIMIT 1",
        payment_id,
        kind,
    )


async def payment_row(db: asyncpg.Connection, payment_id: int) -> Any:
    return await db.fetchrow("SELECT * FROM payments WHERE payment_id = $1", payment_id)


async def assert_consistent(db: asyncpg.Connection) -> None:
    """`payment-service check`'s invariants hold."""
    report = await check_database(db, idempotency_key_ttl=86400, outbox_retention_hours=168)
    assert report.consistent, [(c.name, c.examples) for c in report.checks if not c.ok]


# -- charges ---------------------------------------------------------------------------------------
async def test_a_charge_is_made_once_and_succeeds(
    charging: RunningApi, db: asyncpg.Connection, embedded_gateway: EmbeddedGateway
) -> None:
    body = payment_body(amount=Decimal("150.00"))
    first = await post_json(charging.client, "/payments", body)

    assert first.status_code == 200, first.text
    payment = exact_json(first)
    assert payment["status"] == "SUCCESS"
    assert payment["failure_code"] is None and payment["failure_message"] is None
    assert payment["gateway_reference"].startswith("pi_")
    assert_replay(first, await post_json(charging.client, "/payments", body))
    assert await events_of(db, payment["payment_id"]) == [("payment.succeeded", 1)]
    done = await operation(db, payment["payment_id"])
    assert (done["phase"], done["intent_id"], done["claim_token"]) == (
        "DONE",
        payment["gateway_reference"],
        None,
    )
    ledger = await ledger_of(embedded_gateway, payment)
    assert len(ledger.intents) == 1 and ledger.intents[0]["id"] == payment["gateway_reference"]
    assert (ledger.confirmed_intents, ledger.charged_intents) == (1, 1)
    assert ledger.intents[0]["amount"] == 15000 and ledger.intents[0]["currency"] == "inr"
    assert ledger.intents[0]["metadata"]["payment_id"] == str(payment["payment_id"])
    assert ledger.intents[0]["metadata"]["trip_id"] == str(payment["trip_id"])
    await assert_consistent(db)


async def test_a_declined_card_is_a_failed_payment_that_frees_the_trip(
    charging: RunningApi, db: asyncpg.Connection, embedded_gateway: EmbeddedGateway
) -> None:
    method = await make_payment_method(embedded_gateway.base_url, card=CARD_DECLINED)

    declined = await pay(charging, payment_method=method)

    assert declined["status"] == "FAILED"
    assert declined["failure_code"] == "card_declined"
    assert declined["failure_message"] == "Your card was declined."
    assert await events_of(db, declined["payment_id"]) == [("payment.failed", 1)]
    ledger = await ledger_of(embedded_gateway, declined)
    assert (len(ledger.intents), ledger.confirmed_intents, ledger.charged_intents) == (1, 1, 0)
    # The trip may be charged again, with another key (the rider's other card, here the default).
    again = await pay(charging, trip_id=declined["trip_id"])
    assert again["status"] == "SUCCESS"
    assert (await ledger_of(embedded_gateway, again)).charged_intents == 1
    await assert_consistent(db)


async def test_a_card_that_needs_3d_secure_is_canceled_then_failed(
    charging: RunningApi, db: asyncpg.Connection, embedded_gateway: EmbeddedGateway
) -> None:
    """A charge after the ride cannot ask the rider to authenticate: the intent is canceled at
    the gateway, and only then is the payment FAILED (authentication_required)."""
    method = await make_payment_method(embedded_gateway.base_url, card=CARD_3DS)

    failed = await pay(charging, payment_method=method)

    assert failed["status"] == "FAILED"
    assert failed["failure_code"] == "authentication_required"
    assert "3-D Secure" in failed["failure_message"]
    ledger = await ledger_of(embedded_gateway, failed)
    assert [i["status"] for i in ledger.intents] == ["canceled"]
    assert ledger.charged_intents == 0
    assert (await pay(charging, trip_id=failed["trip_id"]))["status"] == "SUCCESS"
    await assert_consistent(db)


async def test_methods_the_gateway_does_not_charge_are_recorded_at_once(
    charging: RunningApi, db: asyncpg.Connection, embedded_gateway: EmbeddedGateway
) -> None:
    cash = await pay(charging, method="CASH")
    assert cash["status"] == "SUCCESS" and cash["gateway_reference"] is None
    assert await operation(db, cash["payment_id"]) is None
    assert (await ledger_of(embedded_gateway, cash)).intents == []
    # Refunded at once too: nothing was charged at the gateway.
    refunded = await refund(charging, cash["payment_id"], "50.00")
    assert refunded.status_code == 200 and refunded.json()["status"] == "REFUNDED"
    assert (await ledger_of(embedded_gateway, cash)).refunds == []


async def test_requests_the_gateway_cannot_carry_are_refused_before_anything_is_stored(
    api_factory: ApiFactory, embedded_gateway: EmbeddedGateway, db: asyncpg.Connection
) -> None:
    charging = await api_factory(**gateway_settings(embedded_gateway.base_url))
    yen = await post_json(
        charging.client, "/payments", payment_body(amount=Decimal("10.50"), currency="JPY")
    )
    assert "JPY" in assert_problem(yen, 400, "AMOUNT_NOT_REPRESENTABLE")["detail"]
    for field, value in (("payment_method", "card_visa"), ("customer", "pm_x")):
        odd = await post_json(charging.client, "/payments", payment_body(**{field: value}))
        assert_problem(odd, 400, "VALIDATION_ERROR")
    # A live key never charges a made-up payment method: the request must name one. (A live key
    # travels over https only; the request is refused before any call, so nothing listens there.)
    live = await api_factory(
        **gateway_settings(
            "https://127.0.0.1:9", stripe_secret_key="sk_live_x", stripe_api_flavour="stripe"
        )
    )
    nameless = await post_json(live.client, "/payments", payment_body())
    assert_problem(nameless, 400, "PAYMENT_METHOD_REQUIRED")
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0


async def test_concurrent_requests_with_one_key_charge_once(
    charging: RunningApi, db: asyncpg.Connection, embedded_gateway: EmbeddedGateway
) -> None:
    body = payment_body()

    answers = await asyncio.gather(
        *(post_json(charging.new_client(), "/payments", body) for _ in range(8))
    )

    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {200, 409}, [a.text for a in answers]
    for conflict in (a for a in answers if a.status_code == 409):
        assert_problem(conflict, 409, "IDEMPOTENCY_KEY_IN_PROGRESS")
        assert conflict.headers["retry-after"]
    assert await db.fetchval("SELECT count(*) FROM payments") == 1
    replay = await post_json(charging.client, "/payments", body)
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    ledger = await ledger_of(embedded_gateway, exact_json(replay))
    assert (len(ledger.intents), ledger.confirmed_intents, ledger.charged_intents) == (1, 1, 1)


async def test_a_retry_while_the_charge_is_at_the_gateway_is_409_then_the_answer(
    api_factory: ApiFactory, proxy: FaultProxy, db: asyncpg.Connection
) -> None:
    """The key is taken without an answer while its charge is made: a retry meanwhile is 409
    with Retry-After (nothing executed twice), and afterwards the replay of the answer."""
    api = await api_factory(**gateway_settings(proxy.base_url, gateway_timeout_seconds=30))
    held = proxy.on(CONFIRM, delay(60))  # forwarded at release()
    body = payment_body()
    first = asyncio.create_task(post_json(api.client, "/payments", body))
    await wait_for(lambda: held.hits == 1, timeout=10, what="the confirm to reach the gateway")

    retry = await post_json(api.new_client(), "/payments", body)

    assert_problem(retry, 409, "IDEMPOTENCY_KEY_IN_PROGRESS")
    assert retry.headers["retry-after"] == "1"
    row = await db.fetchrow("SELECT response_status, response_data FROM idempotency_keys")
    assert tuple(row) == (None, None), "taken, not answered"
    proxy.release()
    answered = await first
    assert answered.status_code == 200, answered.text
    assert_replay(answered, await post_json(api.client, "/payments", body))


# -- unknown outcomes: 202, then the gateway worker or the webhook decides -------------------------
async def test_a_create_answered_500_is_202_then_the_worker_charges_it_once(
    behind_proxy: RunningApi,
    proxy: FaultProxy,
    db: asyncpg.Connection,
    database_url: str,
    embedded_gateway: EmbeddedGateway,
) -> None:
    proxy.on(CREATE, answer(500))  # the gateway never saw it
    body = payment_body()
    first = await post_json(behind_proxy.client, "/payments", body)

    assert first.status_code == 202, first.text
    pending = exact_json(first)

    assert pending["status"] == "PENDING"
    assert pending["message"] == "Payment accepted for processing"
    assert await events_of(db, pending["payment_id"]) == [("payment.pending", 1)]
    waiting = await operation(db, pending["payment_id"])
    assert (waiting["phase"], waiting["intent_id"]) == ("PENDING", None)
    assert (await ledger_of(embedded_gateway, pending)).intents == []

    async with running_worker(database_url, embedded_gateway.base_url):
        await wait_for(
            lambda: _status_is(db, pending["payment_id"], "SUCCESS"),
            timeout=20,
            what="the worker to charge it",
        )

    assert await events_of(db, pending["payment_id"]) == [
        ("payment.pending", 1),
        ("payment.succeeded", 2),
    ]
    ledger = await ledger_of(embedded_gateway, pending)
    assert (len(ledger.intents), ledger.confirmed_intents, ledger.charged_intents) == (1, 1, 1)
    # The key's answer stays the first one, 202: the client polls the payment.
    assert_replay(first, await post_json(behind_proxy.client, "/payments", body))
    polled = exact_json(await behind_proxy.client.get(f"/payments/{pending['payment_id']}"))
    assert polled["status"] == "SUCCESS"
    await assert_consistent(db)


async def _status_is(db: asyncpg.Connection, payment_id: int, status: str) -> bool:
    return bool((await payment_row(db, payment_id))["status"] == status)


async def test_a_confirm_that_hangs_past_the_time_out_is_decided_by_asking_not_charging_again(
    behind_proxy: RunningApi,
    proxy: FaultProxy,
    db: asyncpg.Connection,
    database_url: str,
    embedded_gateway: EmbeddedGateway,
) -> None:
    proxy.on(CONFIRM, HANG)  # forwarded (the gateway charged), the answer held past 1 s

    pending = await pay(behind_proxy, 202)

    assert (await operation(db, pending["payment_id"]))["intent_id"] is not None
    async with running_worker(database_url, embedded_gateway.base_url):
        await wait_for(
            lambda: _status_is(db, pending["payment_id"], "SUCCESS"),
            timeout=20,
            what="the worker to learn the outcome",
        )
    proxy.release()
    ledger = await ledger_of(embedded_gateway, pending)
    assert (len(ledger.intents), ledger.confirmed_intents, ledger.charged_intents) == (1, 1, 1)
    await assert_consistent(db)


async def test_a_charge_abandoned_mid_call_is_taken_over_and_its_orphan_never_confirmed(
    api_factory: ApiFactory,
    proxy: FaultProxy,
    db: asyncpg.Connection,
    database_url: str,
    embedded_gateway: EmbeddedGateway,
) -> None:
    """The API's create is held at the gateway (as if the API had died there) until its lease
    runs out; the worker takes the charge over and creates its own intent. The API's intent,
    created later, is never recorded, so never confirmed: one charge at the gateway, and the
    answer the request finally gives is the worker's."""
    api = await api_factory(**gateway_settings(proxy.base_url, gateway_timeout_seconds=30))
    held = proxy.on(CREATE, delay(60))  # forwarded at release()
    body = payment_body()
    request = asyncio.create_task(post_json(api.client, "/payments", body))
    await wait_for(lambda: held.hits == 1, timeout=10, what="the create to be held")
    # The lease runs out (the API is gone, as far as anyone can tell).
    await db.execute("UPDATE gateway_operations SET locked_until = now() - interval '1 second'")

    async with running_worker(database_url, embedded_gateway.base_url):
        payment_id = await db.fetchval("SELECT payment_id FROM payments")
        await wait_for(
            lambda: _status_is(db, payment_id, "SUCCESS"),
            timeout=20,
            what="the worker to take the charge over",
        )
    proxy.release()
    answered = await request

    assert answered.status_code == 200, answered.text
    assert exact_json(answered)["status"] == "SUCCESS"
    assert_replay(answered, await post_json(api.client, "/payments", body))
    ledger = await ledger_of(embedded_gateway, exact_json(answered))
    assert len(ledger.intents) == 2, "the worker's intent and the API's orphan"
    assert (ledger.confirmed_intents, ledger.charged_intents) == (1, 1)
    orphan = next(i for i in ledger.intents if i["id"] != exact_json(answered)["gateway_reference"])
    assert orphan["status"] == "requires_confirmation" and not orphan.get("latest_charge")
    await assert_consistent(db)


async def test_an_outcome_that_stays_unknown_is_flagged_for_review_never_failed(
    behind_proxy: RunningApi,
    proxy: FaultProxy,
    db: asyncpg.Connection,
    database_url: str,
    embedded_gateway: EmbeddedGateway,
    tmp_path: Path,
) -> None:
    proxy.on(CONFIRM, DROP_AFTER_FORWARD)  # charged, the answer lost
    pending = await pay(behind_proxy, 202)
    proxy.on(matching(path=r"/v1/.*"), answer(503), times=None)  # then the gateway is down

    async with running_worker(database_url, proxy.base_url, gateway_max_checks=2) as worker:
        await wait_for(
            lambda: _phase_is(db, pending["payment_id"], "REVIEW"),
            timeout=20,
            what="the payment to be flagged for review",
        )
        await wait_for(
            lambda: worker.state.metrics.gateway_review._value.get() == 1,
            timeout=10,
            what="the review metric",
        )

    assert (await payment_row(db, pending["payment_id"]))["status"] == "PENDING"
    assert (await ledger_of(embedded_gateway, pending)).charged_intents == 1
    # `gateway review` lists it with what the gateway says now (asked without the proxy).
    listed = await asyncio.to_thread(
        run_to_end,
        ["gateway", "review", "--json"],
        clean_env(
            DATABASE_URL=database_url,
            GATEWAY="stripe",
            STRIPE_SECRET_KEY=EMBEDDED_API_KEY,
            STRIPE_API_BASE=embedded_gateway.base_url,
            STRIPE_API_FLAVOUR="localstripe",
        ),
        tmp_path,
    )
    assert listed.returncode == 0, listed.stderr
    (flagged,) = json.loads(listed.stdout)
    assert (flagged["kind"], flagged["payment_id"], flagged["payment_status"]) == (
        "charge",
        pending["payment_id"],
        "PENDING",
    )
    assert flagged["gateway_says"].startswith("intent SUCCEEDED"), flagged
    # The operator decides, after checking the gateway.
    decided = await settle(behind_proxy.client, pending["payment_id"], "SUCCESS")
    assert decided.status_code == 200, decided.text
    assert (await operation(db, pending["payment_id"]))["phase"] == "DONE"
    await assert_consistent(db)


async def _phase_is(db: asyncpg.Connection, payment_id: int, phase: str) -> bool:
    return bool((await operation(db, payment_id))["phase"] == phase)


async def test_an_operator_cannot_settle_while_a_call_may_be_in_flight(
    api_factory: ApiFactory, proxy: FaultProxy, db: asyncpg.Connection
) -> None:
    api = await api_factory(
        **gateway_settings(proxy.base_url, gateway_timeout_seconds=30), admin_api_keys=ADMIN_KEYS
    )
    held = proxy.on(CONFIRM, delay(60))  # forwarded at release()
    request = asyncio.create_task(post_json(api.client, "/payments", payment_body()))
    await wait_for(lambda: held.hits == 1, timeout=10, what="the confirm to be held")
    payment_id = await db.fetchval("SELECT payment_id FROM payments")

    refused = await settle(api.new_client(), payment_id, "FAILED")

    assert_problem(refused, 409, "GATEWAY_CALL_IN_PROGRESS")
    proxy.release()
    assert (await request).status_code == 200


# -- webhooks --------------------------------------------------------------------------------------
async def test_an_asynchronous_debit_is_settled_by_the_signed_webhook(
    charging: RunningApi, db: asyncpg.Connection, embedded_gateway: EmbeddedGateway
) -> None:
    """A debit is processing when confirmed (202, payment.pending); the gateway's webhook
    announces its failure a moment later, and the payment is FAILED with its event."""
    register_webhook(embedded_gateway, charging.base_url + WEBHOOK_PATH)
    method = await make_payment_method(embedded_gateway.base_url, iban=IBAN_FAILING)
    body = payment_body(method="NETBANKING", currency="EUR", payment_method=method)
    first = await post_json(charging.client, "/payments", body)
    assert first.status_code == 202, first.text
    pending = exact_json(first)

    await wait_for(
        lambda: _status_is(db, pending["payment_id"], "FAILED"),
        timeout=20,
        what="the webhook to settle it",
    )

    failed = await payment_row(db, pending["payment_id"])
    assert failed["failure_code"] == "card_declined"
    assert await events_of(db, pending["payment_id"]) == [
        ("payment.pending", 1),
        ("payment.failed", 2),
    ]
    # (Events of other tests' payments may arrive too: about intents this database never
    # recorded, they change nothing.)
    stored = await db.fetch(
        "SELECT gateway_type, outcome FROM gateway_events WHERE payment_id = $1",
        pending["payment_id"],
    )
    assert [tuple(r) for r in stored] == [("payment_intent.payment_failed", "applied")]
    assert not await db.fetchval(
        "SELECT count(*) FROM gateway_events WHERE payment_id IS NULL AND outcome <> 'not_ours'"
    )
    assert_replay(first, await post_json(charging.client, "/payments", body))  # still 202
    assert (await ledger_of(embedded_gateway, pending)).charged_intents == 0
    await assert_consistent(db)


async def _lost_confirm(api: RunningApi, proxy: FaultProxy) -> dict[str, Any]:
    """A payment whose confirm reached the gateway (it charged) but whose answer was lost: 202."""
    proxy.on(CONFIRM, DROP_AFTER_FORWARD)
    return await pay(api, 202)


async def test_a_lost_answer_is_settled_by_the_webhook_and_a_repeat_changes_nothing(
    behind_proxy: RunningApi,
    proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    db: asyncpg.Connection,
    embedded_gateway: EmbeddedGateway,
) -> None:
    hooks: FaultProxy = await proxy_factory(behind_proxy.base_url)
    register_webhook(embedded_gateway, hooks.base_url + WEBHOOK_PATH)
    pending = await _lost_confirm(behind_proxy, proxy)
    intent_id = (await operation(db, pending["payment_id"]))["intent_id"]
    delivered = hooks.on(matching("POST", WEBHOOK_PATH, body=intent_id), repeat(3))

    await wait_for(lambda: delivered.hits == 1, timeout=15, what="the webhook")
    await wait_for(
        lambda: _status_is(db, pending["payment_id"], "SUCCESS"),
        timeout=10,
        what="the webhook to settle it",
    )

    (exchange,) = hooks.matching_exchanges(matching(body=intent_id))
    await asyncio.wait_for(exchange.finished.wait(), 15)
    assert exchange.forwarded == 3 and exchange.answered == 200
    assert await events_of(db, pending["payment_id"]) == [
        ("payment.pending", 1),
        ("payment.succeeded", 2),
    ]
    assert await _gateway_event_count(db, intent_id) == 1
    ledger = await ledger_of(embedded_gateway, pending)
    assert (ledger.confirmed_intents, ledger.charged_intents) == (1, 1)
    await assert_consistent(db)


async def test_a_stale_failure_is_checked_with_the_gateway_and_never_moves_a_payment_back(
    behind_proxy: RunningApi,
    proxy: FaultProxy,
    proxy_factory: ProxyFactory,
    db: asyncpg.Connection,
    embedded_gateway: EmbeddedGateway,
) -> None:
    """Out of order: an old failure of the intent (its first attempt, say) arrives while the
    gateway's success is held up on the way, and again after it. The first is checked with the
    gateway, which says succeeded: SUCCESS, not FAILED. The later ones find the payment decided:
    nothing moves."""
    hooks: FaultProxy = await proxy_factory(behind_proxy.base_url)
    register_webhook(embedded_gateway, hooks.base_url + WEBHOOK_PATH)
    pending = await _lost_confirm(behind_proxy, proxy)
    intent_id = (await operation(db, pending["payment_id"]))["intent_id"]
    real = hooks.on(matching("POST", WEBHOOK_PATH, body=intent_id), delay(60))
    await wait_for(lambda: real.hits == 1, timeout=15, what="the gateway's success event")
    stale = {
        **await intent_json(embedded_gateway.base_url, intent_id),
        "status": "requires_payment_method",
        "last_payment_error": {"code": "card_declined", "message": "Your card was declined."},
    }

    outcomes = []
    for event_id in ("evt_stale_1", "evt_stale_2"):
        body, headers = signed_event(event_id, "payment_intent.payment_failed", stale)
        sent = await behind_proxy.client.post(WEBHOOK_PATH, content=body, headers=headers)
        assert sent.status_code == 200, sent.text
        outcomes.append(sent.json()["outcome"])
    hooks.release()  # the gateway's own event, last

    assert outcomes == ["applied", "final_already"]
    assert (await payment_row(db, pending["payment_id"]))["status"] == "SUCCESS"

    async def all_three_stored() -> bool:
        return await _gateway_event_count(db, intent_id) == 3

    await wait_for(all_three_stored, timeout=15, what="the held event")
    stored = dict(
        await db.fetch(
            "SELECT event_id, outcome FROM gateway_events WHERE object_id = $1", intent_id
        )
    )
    assert sorted(stored.values()) == ["applied", "final_already", "final_already"]
    assert stored["evt_stale_1"] == "applied"
    assert await events_of(db, pending["payment_id"]) == [
        ("payment.pending", 1),
        ("payment.succeeded", 2),
    ]
    assert (await ledger_of(embedded_gateway, pending)).charged_intents == 1
    await assert_consistent(db)


async def _gateway_event_count(db: asyncpg.Connection, object_id: str) -> int:
    return int(
        await db.fetchval("SELECT count(*) FROM gateway_events WHERE object_id = $1", object_id)
    )


async def test_a_bad_or_stale_signature_is_400_and_changes_nothing(
    behind_proxy: RunningApi, proxy: FaultProxy, db: asyncpg.Connection
) -> None:
    pending = await _lost_confirm(behind_proxy, proxy)
    intent_id = (await operation(db, pending["payment_id"]))["intent_id"]
    succeeded = {"id": intent_id, "object": "payment_intent", "status": "succeeded"}
    attempts = [
        signed_event("evt_bad_1", "payment_intent.succeeded", succeeded, secret="whsec_other"),
        signed_event(
            "evt_bad_2", "payment_intent.succeeded", succeeded, signed_at=int(time.time()) - 600
        ),
        (signed_event("evt_bad_3", "payment_intent.succeeded", succeeded)[0], {}),
    ]
    for body, headers in attempts:
        response = await behind_proxy.client.post(WEBHOOK_PATH, content=body, headers=headers)
        assert_problem(response, 400, "WEBHOOK_REJECTED")

    assert await _gateway_event_count(db, intent_id) == 0
    assert (await payment_row(db, pending["payment_id"]))["status"] == "PENDING"
    assert await events_of(db, pending["payment_id"]) == [("payment.pending", 1)]


async def test_an_event_about_an_intent_we_did_not_record_changes_nothing(
    charging: RunningApi, db: asyncpg.Connection
) -> None:
    payment = await pay(charging)
    foreign = {
        "id": "pi_someone_elses",
        "object": "payment_intent",
        "status": "succeeded",
        "amount": 100,
        "currency": "inr",
        "created": int(time.time()),
        "metadata": {"payment_id": str(payment["payment_id"])},  # our id, not our intent
    }
    body, headers = signed_event("evt_foreign", "payment_intent.succeeded", foreign)

    response = await charging.client.post(WEBHOOK_PATH, content=body, headers=headers)

    assert response.status_code == 200 and response.json()["outcome"] == "not_ours"
    assert await events_of(db, payment["payment_id"]) == [("payment.succeeded", 1)]


# -- refunds ---------------------------------------------------------------------------------------
async def test_partial_then_full_refunds_are_made_at_the_gateway(
    charging: RunningApi, db: asyncpg.Connection, embedded_gateway: EmbeddedGateway
) -> None:
    payment = await pay(charging, amount=Decimal("150.00"))
    key = new_key("refund")

    partial = await refund(charging, payment["payment_id"], "50.00", key=key)
    rest = await refund(charging, payment["payment_id"])

    assert partial.status_code == 200, partial.text
    first = exact_json(partial)
    assert (first["status"], first["payment_status"], first["remaining_amount"]) == (
        "REFUNDED",
        "PARTIALLY_REFUNDED",
        Decimal("100.00"),
    )
    assert rest.status_code == 200, rest.text
    second = exact_json(rest)
    assert (second["refund_amount"], second["payment_status"]) == (Decimal("100.00"), "REFUNDED")
    assert_replay(partial, await refund(charging, payment["payment_id"], "50.00", key=key))
    ledger = await ledger_of(embedded_gateway, payment)
    assert ledger.refunded == 15000
    assert sorted(int(r["amount"]) for r in ledger.refunds) == [5000, 10000]
    assert {r["metadata"]["refund_id"] for r in ledger.refunds} == {
        str(first["refund_id"]),
        str(second["refund_id"]),
    }
    assert await events_of(db, payment["payment_id"]) == [
        ("payment.succeeded", 1),
        ("payment.refunded", 2),
        ("payment.refunded", 3),
    ]
    listed = exact_json(await charging.client.get(f"/payments/{payment['payment_id']}/refunds"))
    assert all(r["gateway_reference"].startswith("re_") for r in listed["data"])
    await assert_consistent(db)


async def test_a_refund_the_gateway_refuses_is_failed_and_frees_its_amount(
    behind_proxy: RunningApi,
    proxy: FaultProxy,
    db: asyncpg.Connection,
    embedded_gateway: EmbeddedGateway,
) -> None:
    payment = await pay(behind_proxy, amount=Decimal("80.00"))
    proxy.on(REFUND, answer(400))  # refused, never made

    refused = await refund(behind_proxy, payment["payment_id"], "80.00")

    assert refused.status_code == 200, refused.text
    document = exact_json(refused)
    assert (document["status"], document["payment_status"], document["remaining_amount"]) == (
        "FAILED",
        "SUCCESS",
        Decimal("80.00"),
    )
    assert document["failure_code"] == "refused" and document["failure_message"]
    events = await outbox_rows(db, payment["payment_id"])
    assert [(e["event_type"], e["payload"]["sequence"]) for e in events] == [
        ("payment.succeeded", 1),
        ("refund.failed", 2),
    ]
    assert events[1]["payload"]["refund_id"] == document["refund_id"]
    assert (await payment_row(db, payment["payment_id"]))["reserved_amount"] == 0
    assert (await ledger_of(embedded_gateway, payment)).refunds == []
    # The amount is refundable again.
    again = await refund(behind_proxy, payment["payment_id"], "80.00")
    assert again.status_code == 200 and exact_json(again)["status"] == "REFUNDED", again.text
    assert (await ledger_of(embedded_gateway, payment)).refunded == 8000
    await assert_consistent(db)


async def test_a_refund_whose_answer_was_lost_is_found_not_made_twice(
    behind_proxy: RunningApi,
    proxy: FaultProxy,
    db: asyncpg.Connection,
    database_url: str,
    embedded_gateway: EmbeddedGateway,
) -> None:
    """The gateway refunded but its answer was lost: 202, the amount reserved meanwhile (a second
    refund of the rest is refused); the worker finds the refund by our id rather than make it
    again (the embedded gateway ignores idempotency keys)."""
    payment = await pay(behind_proxy, amount=Decimal("60.00"))
    proxy.on(REFUND, DROP_AFTER_FORWARD)

    lost = await refund(behind_proxy, payment["payment_id"], "60.00")

    assert lost.status_code == 202, lost.text
    pending = exact_json(lost)
    assert (pending["status"], pending["remaining_amount"]) == ("PENDING", Decimal("0.00"))
    over = await refund(behind_proxy, payment["payment_id"], "1.00")
    assert_problem(over, 400, "REFUND_EXCEEDS_REMAINING")
    async with running_worker(database_url, embedded_gateway.base_url):
        await wait_for(
            lambda: _status_is(db, payment["payment_id"], "REFUNDED"),
            timeout=20,
            what="the worker to find the refund",
        )
    ledger = await ledger_of(embedded_gateway, payment)
    assert len(ledger.refunds) == 1 and ledger.refunded == 6000
    refunded = await db.fetchrow("SELECT status, gateway_refund_id FROM payment_refunds")
    assert refunded["status"] == "REFUNDED"
    assert refunded["gateway_refund_id"] == ledger.refunds[0]["id"]
    assert await events_of(db, payment["payment_id"]) == [
        ("payment.succeeded", 1),
        ("payment.refunded", 2),
    ]
    await assert_consistent(db)


async def test_a_refund_in_progress_is_settled_by_the_gateways_refund_event(
    behind_proxy: RunningApi,
    proxy: FaultProxy,
    db: asyncpg.Connection,
    embedded_gateway: EmbeddedGateway,
) -> None:
    """Real Stripe announces refunds (the embedded gateway does not): a signed refund event for
    a refund whose answer was lost settles it, found by our refund id in its metadata."""
    payment = await pay(behind_proxy, amount=Decimal("40.00"))
    proxy.on(REFUND, DROP_AFTER_FORWARD)
    lost = await refund(behind_proxy, payment["payment_id"], "40.00")
    assert lost.status_code == 202, lost.text
    (made,) = (await ledger_of(embedded_gateway, payment)).refunds
    body, headers = signed_event("evt_refund_1", "charge.refund.updated", made)

    applied = await behind_proxy.client.post(WEBHOOK_PATH, content=body, headers=headers)

    assert applied.status_code == 200 and applied.json()["outcome"] == "applied", applied.text
    row = await db.fetchrow("SELECT status, gateway_refund_id FROM payment_refunds")
    assert tuple(row) == ("REFUNDED", made["id"])
    assert (await payment_row(db, payment["payment_id"]))["status"] == "REFUNDED"
    assert await events_of(db, payment["payment_id"]) == [
        ("payment.succeeded", 1),
        ("payment.refunded", 2),
    ]
    repeated = await behind_proxy.client.post(WEBHOOK_PATH, content=body, headers=headers)
    assert repeated.json()["outcome"] == "duplicate"
    assert (await ledger_of(embedded_gateway, payment)).refunded == 4000
    await assert_consistent(db)


async def test_concurrent_refunds_at_the_gateway_never_exceed_the_payment(
    charging: RunningApi, db: asyncpg.Connection, embedded_gateway: EmbeddedGateway
) -> None:
    payment = await pay(charging, amount=Decimal("100.00"))

    answers = await asyncio.gather(
        *(
            post_json(
                charging.new_client(),
                f"/payments/{payment['payment_id']}/refunds",
                {"idempotency_key": new_key("refund"), "amount": Decimal("30.00")},
            )
            for _ in range(5)
        )
    )

    refunded = [a for a in answers if a.status_code == 200]
    assert len(refunded) == 3, [a.text for a in answers]
    for refused in (a for a in answers if a.status_code != 200):
        assert_problem(refused, 400, "REFUND_EXCEEDS_REMAINING")
    assert (await ledger_of(embedded_gateway, payment)).refunded == 9000
    await assert_consistent(db)


# -- secrets ---------------------------------------------------------------------------------------
async def test_the_gateways_secrets_never_reach_a_log_an_answer_health_or_metrics(
    api_factory: ApiFactory,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = f"sk_test_canary{secrets.token_hex(8)}"  # the embedded gateway takes any sk_ key
    webhook_secret = f"whsec_canary{secrets.token_hex(8)}"
    caplog.set_level(logging.DEBUG)
    api = await api_factory(
        **gateway_settings(
            proxy.base_url,
            gateway_timeout_seconds=1,
            stripe_secret_key=key,
            stripe_webhook_secret=webhook_secret,
        ),
        log_level="DEBUG",
    )
    proxy.on(CREATE, answer(401))  # the key refused: an unknown outcome, never a failure
    refused_key = await post_json(api.client, "/payments", payment_body())
    proxy.on(CONFIRM, HANG)  # a time-out
    timed_out = await post_json(api.client, "/payments", payment_body())
    charged = await post_json(api.client, "/payments", payment_body())
    bad_signature = await api.client.post(
        WEBHOOK_PATH,
        content=b'{"id": "evt_1", "object": "event"}',
        headers={"Stripe-Signature": "t=1,v1=00"},
    )
    body, headers = signed_event("evt_canary", "payment_intent.succeeded", {"id": "pi_x"})
    not_an_event = await api.client.post(WEBHOOK_PATH, content=body, headers=headers)
    proxy.release()
    seen = [
        refused_key,
        timed_out,
        charged,
        bad_signature,
        not_an_event,
        await api.client.get("/health"),
        await api.client.get("/metrics"),
        await api.client.get("/openapi.json"),
    ]

    assert [r.status_code for r in seen[:5]] == [202, 202, 200, 400, 400], [r.text for r in seen]
    shown = "".join(r.text + str(r.headers) for r in seen)
    logged = "".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert caplog.records, "something was logged"
    for secret in (key, webhook_secret):
        assert secret not in shown
        assert secret not in logged
        assert secret not in repr(api.settings)
