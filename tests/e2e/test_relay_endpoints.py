"""Subscriptions end to end: real relay processes, two real receivers on 127.0.0.1, a real
PostgreSQL. Each endpoint gets every event it subscribes to, signed with its own secret, in order
per (endpoint, payment); one endpoint that is down, answers 500 or hangs never delays another,
and loses nothing once it is back; a rotated secret signs with every secret of the last day, and
each attempt's log names the secrets that signed it by their fingerprints."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from payment_service.endpoints import (
    rotate_secret,
    select_endpoint,
    update_endpoint,
)
from payment_service.signing import fingerprint, secret_key
from tests.support.audit import OPERATOR
from tests.support.database import EventRow, insert_events, status_counts
from tests.support.environment import CALLBACK_PATH, SECRET, new_signing_secret
from tests.support.processes import RelayLauncher, dump_logs
from tests.support.receiver import (
    Receiver,
    answer_ok,
    answer_status,
    assert_ordered_per_payment,
    subscribed,
)
from tests.support.waiting import wait_for

TRIP_SECRET = new_signing_secret()


@pytest.fixture
async def trip(conn: asyncpg.Connection) -> AsyncIterator[Receiver]:
    """A second receiver, subscribed as endpoint `trip` with a secret of its own."""
    async with subscribed(conn, "trip", secret=TRIP_SECRET) as receiver:
        yield receiver


def assert_sequence_grows(receiver: Receiver, events: list[EventRow]) -> None:
    """Each payment's accepted events arrived with a growing position (`insert_events` writes
    it as `seq`, beside the `sequence` the API's state changes would have counted)."""
    payments = {e.event_id: e.payment_id for e in events}
    last: dict[int, int] = {}
    for delivery in receiver.accepted():
        payment = payments[delivery.webhook_id]
        sequence = int(delivery.event["seq"])
        assert sequence > last.get(payment, 0), (payment, sequence, last.get(payment))
        last[payment] = sequence


async def test_two_endpoints_each_get_every_event_in_order_signed_with_their_own_secret(
    conn: asyncpg.Connection, receiver: Receiver, trip: Receiver, relays: RelayLauncher
) -> None:
    started = [relays.start(relay_batch_size=20) for _ in range(2)]
    await wait_for(
        lambda: all(r.logged("delivering to endpoint") == 2 for r in started),
        timeout=60,
        what="both relays to deliver to both endpoints",
    )
    events = await insert_events(conn, payments=150, events_per_payment=3)
    ids = {e.event_id for e in events}
    await wait_for(
        lambda: ids <= receiver.accepted_ids() and ids <= trip.accepted_ids(),
        timeout=90,
        what="every event at both endpoints",
    )
    for r, own, other in ((receiver, SECRET, TRIP_SECRET), (trip, TRIP_SECRET, SECRET)):
        # two relays, never one delivery acknowledged twice
        assert len(r.deliveries) == len(ids)
        assert set(r.accepted_counts().values()) == {1}
        assert_ordered_per_payment(r, events)
        assert_sequence_grows(r, events)
        for delivery in r.deliveries:
            assert delivery.verify(own)["event_id"] == delivery.webhook_id
            with pytest.raises(WebhookVerificationError):
                delivery.verify(other)
    # the same webhook-id and body at both endpoints
    bodies = {d.webhook_id: d.body for d in receiver.deliveries}
    assert all(bodies[d.webhook_id] == d.body for d in trip.deliveries)
    for relay in started:
        relay.send(signal.SIGTERM)
    assert [await r.wait_exit(timeout=20) for r in started] == [0, 0], dump_logs(started)
    assert await status_counts(conn, "trip") == {"DELIVERED": len(ids)}
    assert await status_counts(conn, "notification") == {"DELIVERED": len(ids)}


@pytest.mark.parametrize("mode", ["refused", "500", "hang"])
async def test_an_endpoint_that_is_down_never_delays_another_and_loses_nothing(
    conn: asyncpg.Connection,
    receiver: Receiver,
    trip: Receiver,
    relays: RelayLauncher,
    mode: str,
) -> None:
    if mode == "refused":
        await trip.stop_listening()
    elif mode == "500":
        trip.policy = answer_status(500)
    else:
        trip.hold()  # every request unanswered until the relay's timeout (2 s)
    relay = relays.start(relay_retry_schedule="0.5,1", relay_concurrency=8)
    await wait_for(
        lambda: relay.logged("delivering to endpoint") == 2,
        timeout=60,
        what="the relay to deliver to both endpoints",
    )
    # Rounds of events while trip fails: the healthy endpoint gets each round within a generous
    # bound, whatever trip's deliveries are doing (queued, hanging, retrying).
    events: list[EventRow] = []
    for _ in range(3):
        batch = await insert_events(conn, payments=40, events_per_payment=2)
        events += batch
        ids = {e.event_id for e in batch}

        def arrived(ids: set[str] = ids) -> bool:
            return ids <= receiver.accepted_ids()

        await wait_for(
            arrived,
            timeout=10,
            what="the healthy endpoint's events while the other is down",
        )
    assert not trip.accepted_ids()
    assert trip.deliveries or mode == "refused"
    # trip comes back: it gets everything, in order, nothing lost
    if mode == "refused":
        await trip.listen_again()
    elif mode == "500":
        trip.policy = answer_ok
    else:
        trip.release()
    everything = {e.event_id for e in events}
    await wait_for(lambda: everything <= trip.accepted_ids(), timeout=90, what="trip to catch up")
    assert_ordered_per_payment(trip, events)
    assert_ordered_per_payment(receiver, events)
    assert receiver.accepted_counts() == {event_id: 1 for event_id in everything}
    assert relay.process is not None and relay.process.poll() is None, dump_logs([relay])


async def test_after_two_rotations_callbacks_carry_every_secret_of_the_day(
    conn: asyncpg.Connection, receiver: Receiver, trip: Receiver, relays: RelayLauncher
) -> None:
    relay = relays.start()
    await wait_for(
        lambda: relay.logged("delivering to endpoint") == 2, timeout=60, what="both endpoints"
    )
    before = await insert_events(conn, payments=3)
    await wait_for(
        lambda: {e.event_id for e in before} <= trip.accepted_ids(), timeout=30, what="before"
    )
    new = new_signing_secret()
    await rotate_secret(
        conn, "trip", secret=new, operator=OPERATOR
    )  # NOTIFYs: the relay reloads at once

    def signed_by(count: int) -> Callable[[], Awaitable[bool]]:
        async def arrived() -> bool:
            await insert_events(conn, payments=1)  # one more event per check, until one is so
            return any(
                len(d.headers.get("webhook-signature", "").split()) == count
                for d in trip.accepted()
            )

        return arrived

    await wait_for(signed_by(2), timeout=30, what="callbacks signed with both secrets")
    # Rotated again within the day (a retry, say): the secret receivers still use keeps signing.
    newest = new_signing_secret()
    await rotate_secret(conn, "trip", secret=newest, operator=OPERATOR)
    await wait_for(signed_by(3), timeout=30, what="callbacks signed with all three secrets")
    signers = {1: [TRIP_SECRET], 2: [new, TRIP_SECRET], 3: [newest, new, TRIP_SECRET]}
    for delivery in trip.accepted():
        signatures = delivery.headers["webhook-signature"].split()
        if delivery.webhook_id in {e.event_id for e in before}:
            assert len(signatures) == 1
        # each secret verifies on its own (the standardwebhooks package): a receiver may switch
        # whenever it likes
        for secret in signers[len(signatures)]:
            assert delivery.verify(secret)["event_id"] == delivery.webhook_id
        if len(signatures) < 3:
            with pytest.raises(WebhookVerificationError):
                delivery.verify(newest)
    # the other endpoint's signing is untouched
    assert all(len(d.headers["webhook-signature"].split()) == 1 for d in receiver.accepted())
    # Each attempt's log says which secrets signed it, by their fingerprints, never the secrets.
    prints = {
        tuple(secrets): " ".join(fingerprint(secret_key(s)) for s in secrets)
        for secrets in signers.values()
    }
    delivered = (
        "SELECT d.attempt_log::text AS log FROM deliveries AS d JOIN endpoints AS n"
        " ON n.endpoint_id = d.endpoint_id WHERE n.name = 'trip' AND d.status = 'DELIVERED'"
    )
    # A callback the receiver accepted is recorded by the relay once its answer is read: wait
    # until every accepted callback is (no more events are written from here on).
    accepted = len(trip.accepted_ids())

    async def all_recorded() -> bool:
        return len(await conn.fetch(delivered)) >= accepted

    await wait_for(all_recorded, timeout=30, what="every accepted callback recorded")
    logs = await conn.fetch(delivered)
    recorded = {json.loads(row["log"])[-1]["signed_with"] for row in logs}
    assert recorded <= set(prints.values()) and prints[(newest, new, TRIP_SECRET)] in recorded
    assert prints[(TRIP_SECRET,)] in recorded
    trip_row = await select_endpoint(conn, "trip")
    assert " ".join(trip_row.signing_fingerprints()) == prints[(newest, new, TRIP_SECRET)]
    assert not any(
        secret.removeprefix("whsec_") in row["log"]
        for row in logs
        for secret in (new, newest, TRIP_SECRET)
    )


async def test_a_relay_start_follows_a_changed_notification_url_until_an_operator_changes_it(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    # `notification` as an earlier NOTIFICATION_SERVICE_URL seeded it: a receiver since moved
    gone = "http://127.0.0.1:9/gone"
    await conn.execute("UPDATE endpoints SET url = $1 WHERE name = 'notification'", gone)
    relay = relays.start()
    events = await insert_events(conn, payments=3)
    await wait_for(
        lambda: {e.event_id for e in events} <= receiver.accepted_ids(),
        timeout=30,
        what="the events at the URL the settings name now",
    )
    now = receiver.base_url + CALLBACK_PATH
    followed = (
        "endpoint notification follows NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH: "
        f"url {gone} → {now}"
    )
    assert relay.logged(followed) == 1, dump_logs([relay])
    relay.send(signal.SIGTERM)
    assert await relay.wait_exit(timeout=20) == 0

    # Changed by an operator since: the next start leaves it, and warns naming the difference.
    await update_endpoint(conn, "notification", url=gone, operator=OPERATOR)
    again = relays.start()
    differs = (
        "endpoint notification differs from NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH: "
        f"url {gone}, the settings say {now} (set by an operator; "
        "`payment-service endpoints update notification --url …` to change it)"
    )
    await wait_for(lambda: again.logged(differs) == 1, timeout=30, what="the warning")
    assert [r["level"] for r in again.log_records() if r.get("msg") == differs] == ["WARNING"]
    assert (await select_endpoint(conn, "notification")).url == gone
