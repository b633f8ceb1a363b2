"""The Stripe adapter against a real embedded gateway (localstripe on 127.0.0.1).

Every outcome is checked twice: in what the adapter answers, and in what the gateway holds, read
with the tests' own client (`read_ledger`). Faults come from the fault-injecting proxy between
the adapter and the gateway.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import stripe

from payment_service.gateway import stripe_adapter
from payment_service.gateway.embedded import EMBEDDED_API_KEY, EmbeddedGateway
from payment_service.gateway.interface import (
    ChargeRequest,
    EventKind,
    GatewayDeclined,
    GatewayEvent,
    GatewayNotFound,
    GatewayOutcomeUnknown,
    GatewayRefused,
    Intent,
    IntentStatus,
    RefundRequest,
    RefundStatus,
    WebhookRejected,
)
from payment_service.gateway.stripe_adapter import StripeGateway
from tests.support.fault_proxy import (
    DROP_AFTER_FORWARD,
    HANG,
    REORDER,
    FaultProxy,
    answer,
    forward_then_answer,
    matching,
    repeat,
)
from tests.support.gateway import (
    CARD_3DS,
    CARD_DECLINED,
    IBAN_FAILING,
    IBAN_OK,
    WEBHOOK_SECRET,
    Ids,
    event_types,
    make_payment_method,
    read_ledger,
    register_webhook,
)
from tests.support.receiver import Receiver
from tests.support.waiting import wait_for

WEBHOOK_PATH = "/gateway/stripe/webhook"
ProxyFactory = Callable[[str], Any]


def make_gateway(base_url: str, *, timeout: float = 5, **options: Any) -> StripeGateway:
    return StripeGateway(
        api_key=options.pop("api_key", EMBEDDED_API_KEY),
        api_base=base_url,
        webhook_secret=options.pop("webhook_secret", WEBHOOK_SECRET),
        timeout_seconds=timeout,
        api_flavour=options.pop("api_flavour", "localstripe"),
    )


GatewayFactory = Callable[..., StripeGateway]


@pytest.fixture(name="gateways")
async def gateways_fixture() -> AsyncIterator[GatewayFactory]:
    """Adapters made with `make_gateway(base_url, ...)`, closed at the end of the test."""
    made: list[StripeGateway] = []

    def make(base_url: str, **options: Any) -> StripeGateway:
        made.append(make_gateway(base_url, **options))
        return made[-1]

    try:
        yield make
    finally:
        for gateway in made:
            await gateway.close()


@pytest.fixture(name="gateway")
def gateway_fixture(embedded_gateway: EmbeddedGateway, gateways: GatewayFactory) -> StripeGateway:
    return gateways(embedded_gateway.base_url)


@pytest.fixture(name="webhooks")
async def webhooks_fixture(embedded_gateway: EmbeddedGateway) -> AsyncIterator[Receiver]:
    """A receiver at our webhook path, registered at the gateway for this test."""
    receiver = await Receiver(path=WEBHOOK_PATH).start()
    register_webhook(embedded_gateway, receiver.base_url + WEBHOOK_PATH)
    try:
        yield receiver
    finally:
        await receiver.close()


def charge(
    payment_id: int,
    *,
    payment_method: str = "pm_card_visa",
    amount: str = "150.00",
    currency: str = "INR",
    method: str = "CARD",
) -> ChargeRequest:
    return ChargeRequest(
        payment_id=payment_id,
        trip_id=1000 + payment_id,
        reference=f"PAY-20261206-{payment_id:08x}",
        amount=Decimal(amount),
        currency=currency,
        method=method,
        payment_method=payment_method,
    )


async def charged(gateway: StripeGateway, payment_id: int, **options: Any) -> str:
    """A succeeded charge for `payment_id`: its intent id."""
    intent = await gateway.create_intent(charge(payment_id, **options))
    confirmed = await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)
    assert confirmed.status == IntentStatus.SUCCEEDED
    return intent.id


async def debit(gateway: StripeGateway, base_url: str, payment_id: int, iban: str) -> Intent:
    """An intent for `payment_id` that debits a bank account (asynchronous), created."""
    method = await make_payment_method(base_url, iban=iban)
    return await gateway.create_intent(
        charge(payment_id, payment_method=method, currency="EUR", method="NETBANKING")
    )


def webhooks_about(receiver: Receiver, object_id: str) -> list[Any]:
    return [d for d in receiver.deliveries if object_id.encode() in d.body]


# -- charges ---------------------------------------------------------------------------------------
async def test_a_charge_is_created_unconfirmed_then_confirmed(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    payment_id = ids.payment()

    created = await gateway.create_intent(charge(payment_id))

    assert created.status == IntentStatus.REQUIRES_CONFIRMATION
    assert (created.amount, created.currency) == (Decimal("150.00"), "INR")
    assert (created.payment_id, created.trip_id) == (payment_id, 1000 + payment_id)
    assert created.reference == f"PAY-20261206-{payment_id:08x}"
    assert created.created.tzinfo is UTC
    ledger = await read_ledger(embedded_gateway.base_url)
    assert len(ledger.intents_of(payment_id)) == 1 and ledger.confirmed(payment_id) == 0
    assert ledger.intents_of(payment_id)[0]["amount"] == 15000
    assert ledger.intents_of(payment_id)[0]["currency"] == "inr"

    confirmed = await gateway.confirm(created.id, payment_id=payment_id, saved_method=False)

    assert confirmed.status == IntentStatus.SUCCEEDED
    assert confirmed.failure_code is None
    assert (await gateway.retrieve(created.id)).status == IntentStatus.SUCCEEDED
    ledger = await read_ledger(embedded_gateway.base_url)
    assert ledger.confirmed(payment_id) == 1 and ledger.charged(payment_id) == 1


async def test_a_zero_decimal_currency_is_sent_in_whole_units(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    payment_id = ids.payment()
    intent = await gateway.create_intent(charge(payment_id, amount="500", currency="JPY"))
    assert (intent.amount, intent.currency) == (Decimal("500"), "JPY")
    ledger = await read_ledger(embedded_gateway.base_url)
    assert ledger.intents_of(payment_id)[0]["amount"] == 500


async def test_confirming_again_answers_the_state_instead_of_a_refusal(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    """A confirm whose answer was lost is asked again: the gateway refuses a second confirm, and
    the adapter answers what the first one did. Nothing is charged twice."""
    payment_id = ids.payment()
    intent_id = await charged(gateway, payment_id)

    again = await gateway.confirm(intent_id, payment_id=payment_id, saved_method=False)

    assert again.status == IntentStatus.SUCCEEDED
    assert (await read_ledger(embedded_gateway.base_url)).confirmed(payment_id) == 1


async def test_a_decline_is_refused_with_the_gateways_code_and_message(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    payment_id = ids.payment()
    method = await make_payment_method(embedded_gateway.base_url, card=CARD_DECLINED)
    intent = await gateway.create_intent(charge(payment_id, payment_method=method))

    with pytest.raises(GatewayDeclined) as declined:
        await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)

    assert declined.value.code == "card_declined"
    assert declined.value.message == "Your card was declined."
    assert declined.value.http_status == 402
    after = await gateway.retrieve(intent.id)
    assert after.status == IntentStatus.FAILED
    assert (after.failure_code, after.failure_message) == (
        "card_declined",
        "Your card was declined.",
    )
    # A repeated confirm (the decline's answer lost) answers the failure, not a second attempt.
    again = await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)
    assert again.status == IntentStatus.FAILED and again.failure_code == "card_declined"
    ledger = await read_ledger(embedded_gateway.base_url)
    assert ledger.confirmed(payment_id) == 1 and ledger.charged(payment_id) == 0


async def test_the_canonical_declining_test_method_declines_too(
    gateway: StripeGateway, ids: Ids
) -> None:
    payment_id = ids.payment()
    intent = await gateway.create_intent(
        charge(payment_id, payment_method="pm_card_chargeCustomerFail")
    )
    with pytest.raises(GatewayDeclined):
        await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)


async def test_a_3d_secure_card_requires_action_and_can_be_canceled(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    payment_id = ids.payment()
    method = await make_payment_method(embedded_gateway.base_url, card=CARD_3DS)
    intent = await gateway.create_intent(charge(payment_id, payment_method=method))

    confirmed = await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)

    assert confirmed.status == IntentStatus.REQUIRES_ACTION
    canceled = await gateway.cancel(intent.id, payment_id=payment_id)
    assert canceled.status == IntentStatus.CANCELED
    assert (await read_ledger(embedded_gateway.base_url)).confirmed(payment_id) == 0


async def test_canceling_a_charged_intent_answers_that_it_was_charged(
    gateway: StripeGateway, ids: Ids
) -> None:
    payment_id = ids.payment()
    intent_id = await charged(gateway, payment_id)

    answer_ = await gateway.cancel(intent_id, payment_id=payment_id)

    assert answer_.status == IntentStatus.SUCCEEDED


async def test_an_unconfirmed_intent_is_canceled(gateway: StripeGateway, ids: Ids) -> None:
    payment_id = ids.payment()
    intent = await gateway.create_intent(charge(payment_id))
    assert (await gateway.cancel(intent.id, payment_id=payment_id)).status == IntentStatus.CANCELED
    # Nothing left to confirm: a confirm answers the intent as it stands.
    again = await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)
    assert again.status == IntentStatus.CANCELED


async def test_a_failing_debit_is_processing_then_failed(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    payment_id = ids.payment()
    intent = await debit(gateway, embedded_gateway.base_url, payment_id, IBAN_FAILING)

    confirmed = await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)

    assert confirmed.status == IntentStatus.PROCESSING
    failed = await wait_for(
        lambda: _when(gateway.retrieve(intent.id), lambda i: i.status == IntentStatus.FAILED),
        timeout=10,
        what="the debit to fail",
    )
    assert failed.failure_code == "card_declined"  # the embedded gateway's only failure code
    assert (await read_ledger(embedded_gateway.base_url)).charged(payment_id) == 0


async def test_a_good_debit_succeeds_at_once(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    payment_id = ids.payment()
    intent = await debit(gateway, embedded_gateway.base_url, payment_id, IBAN_OK)
    confirmed = await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)
    assert confirmed.status == IntentStatus.SUCCEEDED


async def test_the_embedded_gateway_refuses_off_session_and_the_refusal_stands(
    embedded_gateway: EmbeddedGateway,
    ids: Ids,
    gateways: GatewayFactory,
) -> None:
    """With the real-Stripe flavour a saved method is confirmed off-session, which the embedded
    gateway refuses: the intent stays unconfirmed and the refusal reaches the caller."""
    gateway = gateways(embedded_gateway.base_url, api_flavour="stripe")
    payment_id = ids.payment()
    intent = await gateway.create_intent(charge(payment_id))
    with pytest.raises(GatewayRefused) as refused:
        await gateway.confirm(intent.id, payment_id=payment_id, saved_method=True)
    assert refused.value.message == "Unexpected off_session"
    assert (await gateway.retrieve(intent.id)).status == IntentStatus.REQUIRES_CONFIRMATION
    # Not a saved method: no off_session, and the same gateway charges.
    done = await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)
    assert done.status == IntentStatus.SUCCEEDED


async def test_a_repeated_create_makes_a_second_intent_at_the_embedded_gateway(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    """The embedded gateway ignores idempotency keys (Stripe replays them): the service must
    only ever confirm the intent whose id it recorded."""
    payment_id = ids.payment()
    first = await gateway.create_intent(charge(payment_id))
    second = await gateway.create_intent(charge(payment_id))
    assert first.id != second.id
    ledger = await read_ledger(embedded_gateway.base_url)
    assert len(ledger.intents_of(payment_id)) == 2 and ledger.confirmed(payment_id) == 0


async def test_an_unknown_intent_is_not_found(gateway: StripeGateway) -> None:
    with pytest.raises(GatewayNotFound) as missing:
        await gateway.retrieve("pi_doesnotexist")
    assert missing.value.http_status == 404


async def test_an_unknown_payment_method_is_refused(gateway: StripeGateway, ids: Ids) -> None:
    with pytest.raises(GatewayRefused) as refused:
        await gateway.create_intent(charge(ids.payment(), payment_method="pm_missing"))
    assert refused.value.http_status == 404


# -- refunds ---------------------------------------------------------------------------------------
async def test_partial_then_full_refunds(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    payment_id = ids.payment()
    intent_id = await charged(gateway, payment_id)
    first_id, second_id = ids.refund(), ids.refund()

    first = await gateway.refund(
        RefundRequest(first_id, payment_id, intent_id, Decimal("50.00"), "INR")
    )
    second = await gateway.refund(
        RefundRequest(second_id, payment_id, intent_id, Decimal("100.00"), "INR")
    )

    assert (first.status, first.amount, first.currency) == (
        RefundStatus.SUCCEEDED,
        Decimal("50.00"),
        "INR",
    )
    assert (first.refund_id, first.payment_id, first.intent_id) == (first_id, payment_id, intent_id)
    assert second.amount == Decimal("100.00")
    assert (await gateway.retrieve_refund(first.id)) == first
    assert (await gateway.find_refund(intent_id, second_id)) == second
    assert (await gateway.find_refund(intent_id, ids.refund())) is None
    ledger = await read_ledger(embedded_gateway.base_url)
    assert ledger.refunded_minor_units(payment_id) == 15000
    assert ledger.refunds_for(first_id) == 1 and ledger.refunds_for(second_id) == 1


async def test_a_refund_of_a_failed_payment_is_refused(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    payment_id = ids.payment()
    method = await make_payment_method(embedded_gateway.base_url, card=CARD_DECLINED)
    intent = await gateway.create_intent(charge(payment_id, payment_method=method))
    with pytest.raises(GatewayDeclined):
        await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)

    with pytest.raises(GatewayRefused) as refused:
        await gateway.refund(
            RefundRequest(ids.refund(), payment_id, intent.id, Decimal("1.00"), "INR")
        )

    assert refused.value.http_status == 400
    assert refused.value.message == "Cannot refund a failed payment."
    assert (await read_ledger(embedded_gateway.base_url)).refunds_of(payment_id) == []


# -- reconciliation ------------------------------------------------------------------------------
async def test_list_since_pages_through_intents_and_refunds_in_the_window(
    gateway: StripeGateway, ids: Ids, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stripe_adapter, "LIST_PAGE_SIZE", 2)  # several pages from a few objects
    before = datetime.now(UTC) - timedelta(seconds=1)
    payments = [ids.payment() for _ in range(3)]
    intents = [await charged(gateway, payment_id) for payment_id in payments]
    refund_id = ids.refund()
    await gateway.refund(RefundRequest(refund_id, payments[0], intents[0], Decimal("1.00"), "INR"))

    listing = await gateway.list_since(before)

    assert {i.id for i in listing.intents} >= set(intents)
    assert {i.payment_id for i in listing.intents if i.id in intents} == set(payments)
    assert all(i.created >= before.replace(microsecond=0) for i in listing.intents)
    assert refund_id in {r.refund_id for r in listing.refunds}
    later = await gateway.list_since(datetime.now(UTC) + timedelta(seconds=5))
    assert later.intents == () and later.refunds == ()
    earlier = await gateway.list_since(before - timedelta(hours=1), before - timedelta(minutes=1))
    assert not set(intents) & {i.id for i in earlier.intents}


# -- webhooks --------------------------------------------------------------------------------------
async def test_a_charge_is_announced_by_a_signed_webhook(
    gateway: StripeGateway, webhooks: Receiver, ids: Ids
) -> None:
    payment_id = ids.payment()
    intent_id = await charged(gateway, payment_id)

    delivery = (
        await wait_for(
            lambda: webhooks_about(webhooks, intent_id), timeout=10, what="the charge's webhook"
        )
    )[0]

    event = gateway.parse_webhook(delivery.body, delivery.headers)
    assert event.kind == EventKind.INTENT and event.id.startswith("evt_")
    assert event.gateway_type == "payment_intent.succeeded"
    assert event.intent is not None
    assert (event.intent.id, event.intent.status) == (intent_id, IntentStatus.SUCCEEDED)
    assert event.intent.payment_id == payment_id


async def test_a_decline_and_a_failed_debit_are_announced_as_failures(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, webhooks: Receiver, ids: Ids
) -> None:
    card = await make_payment_method(embedded_gateway.base_url, card=CARD_DECLINED)
    declined = await gateway.create_intent(charge(ids.payment(), payment_method=card))
    with pytest.raises(GatewayDeclined):
        await gateway.confirm(declined.id, payment_id=declined.payment_id or 0, saved_method=False)
    failing = await debit(gateway, embedded_gateway.base_url, ids.payment(), IBAN_FAILING)
    await gateway.confirm(failing.id, payment_id=failing.payment_id or 0, saved_method=False)

    for intent_id in (declined.id, failing.id):
        delivery = (
            await wait_for(
                functools.partial(webhooks_about, webhooks, intent_id),
                timeout=10,
                what="the failure's webhook",
            )
        )[0]
        event = gateway.parse_webhook(delivery.body, delivery.headers)
        assert event.gateway_type == "payment_intent.payment_failed"
        assert event.intent is not None and event.intent.status == IntentStatus.FAILED
        assert event.intent.failure_code == "card_declined"


async def test_refunds_and_processing_make_no_events_at_the_embedded_gateway(
    gateway: StripeGateway, embedded_gateway: EmbeddedGateway, ids: Ids
) -> None:
    """Events are made (and stored) when the change happens, and sent a second later: the event
    list right after a refund and a processing debit holds every event they made."""
    before = await event_types(embedded_gateway.base_url)
    payment_id = ids.payment()
    intent_id = await charged(gateway, payment_id)
    await gateway.refund(
        RefundRequest(ids.refund(), payment_id, intent_id, Decimal("10.00"), "INR")
    )
    processing = await debit(gateway, embedded_gateway.base_url, ids.payment(), IBAN_FAILING)
    confirmed = await gateway.confirm(processing.id, payment_id=0, saved_method=False)
    assert confirmed.status == IntentStatus.PROCESSING

    made = (await event_types(embedded_gateway.base_url))[len(before) :]

    assert "payment_intent.succeeded" in made  # the charge's
    assert not [t for t in made if "refund" in t or "processing" in t], made


async def test_the_proxy_repeats_and_reorders_the_gateways_webhooks(
    gateway: StripeGateway,
    embedded_gateway: EmbeddedGateway,
    webhooks: Receiver,
    proxy_factory: ProxyFactory,
    ids: Ids,
) -> None:
    """In front of our webhook URL, the proxy turns the gateway's one delivery per event into a
    repeated one, and two events into two deliveries in the opposite order."""
    proxy: FaultProxy = await proxy_factory(webhooks.base_url)
    register_webhook(embedded_gateway, proxy.base_url + WEBHOOK_PATH)
    first = await gateway.create_intent(charge(ids.payment()))
    second = await gateway.create_intent(charge(ids.payment()))
    third = await gateway.create_intent(charge(ids.payment()))
    ours = {first.id, second.id, third.id}
    proxy.on(matching("POST", WEBHOOK_PATH, body=first.id), repeat(2))
    proxy.on(
        lambda r: second.id.encode() in r.body or third.id.encode() in r.body, REORDER, times=2
    )

    for intent in (first, second, third):
        await gateway.confirm(intent.id, payment_id=intent.payment_id or 0, saved_method=False)

    def events() -> list[GatewayEvent]:
        parsed = [gateway.parse_webhook(d.body, d.headers) for d in webhooks.deliveries]
        return [e for e in parsed if e.intent is not None and e.intent.id in ours]

    await wait_for(lambda: len(events()) == 4, timeout=15, what="four deliveries")
    about = [event.intent.id for event in events() if event.intent is not None]
    assert about.count(first.id) == 2
    assert len({e.id for e in events() if e.intent and e.intent.id == first.id}) == 1, (
        "a repeat is the same event"
    )
    assert about.index(third.id) < about.index(second.id), "second and third swapped"


def test_a_webhook_with_a_bad_or_stale_signature_is_rejected(gateway: StripeGateway) -> None:
    body = b'{"id": "evt_1", "object": "event", "type": "payment_intent.succeeded", "created": 1}'
    now = int(time.time())

    def signed(secret: str, timestamp: int) -> dict[str, str]:
        header = stripe.WebhookSignature.generate_signature_header(
            body.decode(), secret, timestamp=timestamp
        )
        return {"Stripe-Signature": header}

    with pytest.raises(WebhookRejected):
        gateway.parse_webhook(body, signed("whsec_someone-else", now))
    with pytest.raises(WebhookRejected):
        gateway.parse_webhook(body, signed(WEBHOOK_SECRET, now - 301))  # older than 5 minutes
    with pytest.raises(WebhookRejected):
        gateway.parse_webhook(body, {})
    with pytest.raises(WebhookRejected):
        gateway.parse_webhook(b"\xff" + body, signed(WEBHOOK_SECRET, now))
    # A good signature on a body that is not an event is refused too.
    with pytest.raises(WebhookRejected):
        gateway.parse_webhook(
            body, {"stripe-signature": signed(WEBHOOK_SECRET, now)["Stripe-Signature"]}
        )


async def test_without_a_webhook_secret_no_webhook_is_accepted(
    embedded_gateway: EmbeddedGateway, gateways: GatewayFactory
) -> None:
    gateway = gateways(embedded_gateway.base_url, webhook_secret=None)
    header = stripe.WebhookSignature.generate_signature_header("{}", WEBHOOK_SECRET)
    with pytest.raises(WebhookRejected):
        gateway.parse_webhook(b"{}", {"Stripe-Signature": header})


# -- faults between the adapter and the gateway ----------------------------------------------------
@pytest.fixture(name="proxy")
async def proxy_fixture(
    embedded_gateway: EmbeddedGateway, proxy_factory: ProxyFactory
) -> FaultProxy:
    proxy: FaultProxy = await proxy_factory(embedded_gateway.base_url)
    return proxy


async def test_a_confirm_that_times_out_is_an_unknown_outcome_the_gateway_knows(
    embedded_gateway: EmbeddedGateway,
    proxy: FaultProxy,
    ids: Ids,
    gateways: GatewayFactory,
) -> None:
    gateway = gateways(proxy.base_url, timeout=1)
    payment_id = ids.payment()
    intent = await gateway.create_intent(charge(payment_id))
    proxy.on(matching("POST", r"/v1/payment_intents/\w+/confirm"), HANG)

    with pytest.raises(GatewayOutcomeUnknown) as unknown:
        await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)

    assert unknown.value.reason == "timeout"
    assert (await gateway.retrieve(intent.id)).status == IntentStatus.SUCCEEDED
    assert (await read_ledger(embedded_gateway.base_url)).confirmed(payment_id) == 1


async def test_a_500_before_the_gateway_is_an_unknown_outcome_and_nothing_moved(
    embedded_gateway: EmbeddedGateway,
    proxy: FaultProxy,
    ids: Ids,
    gateways: GatewayFactory,
) -> None:
    gateway = gateways(proxy.base_url)
    payment_id = ids.payment()
    proxy.on(matching("POST", "/v1/payment_intents"), answer(500))

    with pytest.raises(GatewayOutcomeUnknown) as unknown:
        await gateway.create_intent(charge(payment_id))

    assert unknown.value.reason == "http 500"
    assert (await read_ledger(embedded_gateway.base_url)).intents_of(payment_id) == []


async def test_a_500_after_the_gateway_charged_is_an_unknown_outcome(
    embedded_gateway: EmbeddedGateway,
    proxy: FaultProxy,
    ids: Ids,
    gateways: GatewayFactory,
) -> None:
    gateway = gateways(proxy.base_url)
    payment_id = ids.payment()
    intent = await gateway.create_intent(charge(payment_id))
    proxy.on(matching("POST", r"/v1/payment_intents/\w+/confirm"), forward_then_answer(502))

    with pytest.raises(GatewayOutcomeUnknown) as unknown:
        await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)

    assert unknown.value.reason == "http 502"
    # Asking again with the same call answers what happened (the gateway charged once).
    again = await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)
    assert again.status == IntentStatus.SUCCEEDED
    assert (await read_ledger(embedded_gateway.base_url)).confirmed(payment_id) == 1


async def test_a_refund_whose_answer_is_lost_is_found_by_our_id(
    embedded_gateway: EmbeddedGateway,
    proxy: FaultProxy,
    ids: Ids,
    gateways: GatewayFactory,
) -> None:
    gateway = gateways(proxy.base_url)
    payment_id, refund_id = ids.payment(), ids.refund()
    intent_id = await charged(gateway, payment_id)
    proxy.on(matching("POST", "/v1/refunds"), DROP_AFTER_FORWARD)

    with pytest.raises(GatewayOutcomeUnknown) as unknown:
        await gateway.refund(
            RefundRequest(refund_id, payment_id, intent_id, Decimal("20.00"), "INR")
        )

    assert unknown.value.reason == "connection"
    found = await gateway.find_refund(intent_id, refund_id)
    assert found is not None and found.amount == Decimal("20.00")
    assert (await read_ledger(embedded_gateway.base_url)).refunds_for(refund_id) == 1


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (429, "rate limited"),
        (401, "credentials refused (401)"),
        (503, "http 503"),
        (409, "http 409"),
    ],
)
async def test_answers_that_decide_nothing_are_unknown_outcomes(
    embedded_gateway: EmbeddedGateway,
    proxy: FaultProxy,
    ids: Ids,
    status: int,
    reason: str,
    gateways: GatewayFactory,
) -> None:
    gateway = gateways(proxy.base_url)
    proxy.on(matching("POST"), answer(status))
    with pytest.raises(GatewayOutcomeUnknown) as unknown:
        await gateway.create_intent(charge(ids.payment()))
    assert unknown.value.reason == reason


async def test_a_400_from_the_gateway_is_a_refusal(
    proxy: FaultProxy, ids: Ids, gateways: GatewayFactory
) -> None:
    gateway = gateways(proxy.base_url)
    proxy.on(matching("POST"), answer(400))
    with pytest.raises(GatewayRefused) as refused:
        await gateway.create_intent(charge(ids.payment()))
    assert refused.value.http_status == 400
    assert refused.value.message == "injected by the fault proxy"


async def test_a_gateway_that_is_down_is_an_unknown_outcome(
    ids: Ids, gateways: GatewayFactory
) -> None:
    from payment_service.embedded import free_port

    gateway = gateways(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(GatewayOutcomeUnknown) as unknown:
        await gateway.create_intent(charge(ids.payment()))
    assert unknown.value.reason == "connection"


# -- secrets ---------------------------------------------------------------------------------------
async def test_the_key_and_the_webhook_secret_stay_out_of_logs_reprs_and_errors(
    embedded_gateway: EmbeddedGateway,
    proxy: FaultProxy,
    ids: Ids,
    caplog: pytest.LogCaptureFixture,
    gateways: GatewayFactory,
) -> None:
    key = "sk_test_canary-key-0123456789"
    secret = "whsec_canary-secret-0123456789"
    gateway = gateways(proxy.base_url, api_key=key, webhook_secret=secret)
    caplog.set_level(logging.DEBUG)
    texts = [repr(gateway)]
    payment_id = ids.payment()
    await charged(gateway, payment_id)
    for action in (answer(401), answer(500), answer(400), DROP_AFTER_FORWARD):
        proxy.on(matching("POST"), action)
        with pytest.raises(Exception) as error:
            await gateway.create_intent(charge(payment_id))
        texts += [str(error.value), repr(error.value)]
    with pytest.raises(WebhookRejected) as rejected:
        gateway.parse_webhook(b"{}", {"Stripe-Signature": "t=1,v1=00"})
    texts += [str(rejected.value), repr(rejected.value)]
    texts.append(caplog.text)
    for text in texts:
        assert key not in text and secret not in text
        assert "canary" not in text


async def _when(coroutine: Any, predicate: Callable[[Any], bool]) -> Any:
    value = await coroutine
    return value if predicate(value) else None
