"""Each endpoint's lane pays its own costs, end to end: real relay processes, real receivers on
127.0.0.1, a real PostgreSQL. One endpoint's slow health writes, failing claims or failing tries
never hold back another's deliveries; a retry waits without holding a worker; what a lane could
not write, and deliveries deleted under it, are told as they are. Every assertion is a count taken
at the moment something was reached, never a duration."""

from __future__ import annotations

import itertools
import signal
from collections.abc import AsyncIterator

import asyncpg
import pytest

from payment_service.endpoints import delete_endpoint, insert_endpoint
from tests.support.database import EventRow, insert_events, status_counts
from tests.support.processes import RelayLauncher, dump_logs
from tests.support.receiver import (
    HANG,
    OK,
    Answer,
    Delivery,
    Receiver,
    Reply,
    answer_ok,
    answer_status,
    assert_ordered_per_payment,
    subscribed,
)
from tests.support.waiting import wait_for


@pytest.fixture
async def trip(conn: asyncpg.Connection) -> AsyncIterator[Receiver]:
    """A second healthy receiver, subscribed as endpoint `trip`."""
    async with subscribed(conn, "trip") as receiver:
        yield receiver


@pytest.fixture
async def driver(conn: asyncpg.Connection) -> AsyncIterator[Receiver]:
    """A flapping receiver, subscribed as endpoint `driver`: it answers 500 to every other
    callback (the first, the third, …), 200 to the rest."""
    answers = itertools.cycle([Reply(500, b'{"error": "flapping"}'), OK])

    async def flapping(_delivery: Delivery) -> Answer:
        return next(answers)

    async with subscribed(conn, "driver", policy=flapping) as receiver:
        yield receiver


def has_all(receiver: Receiver, events: list[EventRow]) -> bool:
    return {e.event_id for e in events} <= receiver.accepted_ids()


async def test_in_a_burst_the_healthy_endpoints_get_every_event_while_the_flapping_one_waits(
    conn: asyncpg.Connection,
    database_url: str,
    receiver: Receiver,
    trip: Receiver,
    driver: Receiver,
    relays: RelayLauncher,
) -> None:
    """The flapping endpoint's health writes are slow: its row is locked (as by another relay
    recording its churn) for the whole burst, and the relay's write of its health waits. Each
    lane records its own results and health, so the healthy endpoints get every event of the
    burst that follows, in order (a payment's second event waits for its first to be recorded),
    while the flapping endpoint holds most of its backlog."""
    relay = relays.start()
    await wait_for(
        lambda: relay.logged("delivering to endpoint") == 3, timeout=60, what="three lanes"
    )
    locker = await asyncpg.connect(database_url)
    try:
        lock = locker.transaction()
        await lock.start()
        # FOR NO KEY UPDATE: the API's fan-out (a foreign key's KEY SHARE) still goes through.
        await locker.execute("SELECT 1 FROM endpoints WHERE name = 'driver' FOR NO KEY UPDATE")
        events = await insert_events(conn, payments=20, events_per_payment=2)

        async def health_write_waiting() -> bool:
            waiting = await conn.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock'
                      AND query LIKE '%endpoints%'"""
            )
            return bool(waiting)

        await wait_for(health_write_waiting, timeout=30, what="the flapping one's health write")
        events += await insert_events(conn, payments=100, events_per_payment=2)
        await wait_for(
            lambda: has_all(receiver, events) and has_all(trip, events),
            timeout=60,
            what="every event at both healthy endpoints while the flapping one's row is locked",
        )
        held = (await status_counts(conn, "driver")).get("PENDING", 0)
        assert held > 0.75 * len(events), dump_logs([relay])
        assert driver.deliveries  # it was sent to, and flapped
        await lock.rollback()
    finally:
        await locker.close()
    await wait_for(lambda: has_all(driver, events), timeout=60, what="the flapping one's events")
    for each in (receiver, trip, driver):
        assert_ordered_per_payment(each, events)
    assert set(receiver.accepted_counts().values()) == {1}
    assert set(trip.accepted_counts().values()) == {1}


async def test_a_retry_waits_without_holding_a_worker(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    """Two workers, every try failing, a quick retry waiting 5 s or more: every event still gets
    its first try before most of them have been retried."""
    receiver.policy = answer_status(500)
    relay = relays.start(
        relay_concurrency=2,
        relay_quick_retries=1,
        relay_quick_retry_wait=5,
        relay_lease_seconds=120,
        endpoint_breaker_failures=1000,
    )
    events = await insert_events(conn, payments=30)

    def first_tries() -> int:
        return len({d.webhook_id for d in receiver.deliveries})

    await wait_for(lambda: first_tries() == len(events), timeout=30, what="every first try")
    retries = len(receiver.deliveries) - first_tries()
    assert retries < len(events), f"{retries} retries before the last first try"
    receiver.policy = answer_ok
    await wait_for(lambda: has_all(receiver, events), timeout=60, what="every event")
    assert relay.process is not None and relay.process.poll() is None, dump_logs([relay])


async def test_an_endpoint_failing_its_tries_holds_fewer_of_them_in_flight(
    conn: asyncpg.Connection, receiver: Receiver, trip: Receiver, relays: RelayLauncher
) -> None:
    """Eight slots a lane; `notification` fails its first 60 tries, then holds every request
    unanswered. Its answers have earned it one slot: at the moment `trip` has every event of a
    burst that followed, `notification` holds one request, where a lane with all its slots holds
    eight. Answering again, it gets everything."""
    failures = 60

    async def failing_then_holding(_delivery: Delivery) -> Answer:
        return Reply(500, b'{"error": "test"}') if len(receiver.deliveries) <= failures else HANG

    receiver.policy = failing_then_holding
    relays.start(
        relay_concurrency=16,  # two lanes: eight slots each
        relay_quick_retries=0,
        relay_retry_schedule=0.05,
        relay_request_timeout=60,  # nothing held is given up during the test
        endpoint_breaker_failures=1000,
    )
    events = await insert_events(conn, payments=20)
    await wait_for(lambda: receiver.held() >= 1, timeout=30, what="the failures, then a hold")
    events += await insert_events(conn, payments=200)
    await wait_for(lambda: has_all(trip, events), timeout=60, what="every event at trip")
    assert receiver.held() == 1
    receiver.release(answer_ok)
    await wait_for(lambda: has_all(receiver, events), timeout=60, what="every event")


async def test_an_endpoint_whose_claims_fail_never_stops_another_nor_strands_its_probe(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    """Every claim of `trip` fails (a trigger refuses its leases). `notification`'s breaker is
    half-open: its probe, then everything, still goes out; no lease of it is left to run out."""
    trip_id = (await insert_endpoint(conn, name="trip", url="http://127.0.0.1:9/trip")).endpoint_id
    await conn.execute(
        """CREATE FUNCTION refuse_trip_claims() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'claims of trip fail'; END $$"""
    )
    await conn.execute(
        f"""CREATE TRIGGER refuse_trip_claims BEFORE UPDATE ON deliveries FOR EACH ROW
            WHEN (NEW.endpoint_id = {int(trip_id)} AND NEW.claim_token IS NOT NULL)
            EXECUTE FUNCTION refuse_trip_claims()"""
    )
    await conn.execute(
        """UPDATE endpoints
              SET breaker_open_until = now() - interval '1 second',
                  breaker_cooldown_seconds = 1, consecutive_failures = 5,
                  failing_since = now() - interval '1 minute'
            WHERE name = 'notification'"""
    )
    # a long lease: a probe or claim stranded by the failing claim would not come back in time
    relay = relays.start(relay_lease_seconds=600)
    events = await insert_events(conn, payments=20, events_per_payment=2)
    await wait_for(lambda: has_all(receiver, events), timeout=30, what="every event")
    assert_ordered_per_payment(receiver, events)
    assert relay.logged("probing endpoint") >= 1
    assert relay.logged("relay loop crashed; it restarts after a delay") >= 1, dump_logs([relay])
    assert await status_counts(conn, "trip") == {"PENDING": len(events)}


async def test_removing_an_endpoint_mid_flight_is_told_as_such(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    """One relay; the endpoint is removed while its callbacks are in flight. Their results find
    no row: the relay says the deliveries went with their endpoint, not that another relay took
    them over."""
    receiver.hold()
    relay = relays.start(relay_request_timeout=30)
    events = await insert_events(conn, payments=5)
    await wait_for(lambda: receiver.held() == len(events), timeout=30, what="callbacks in flight")
    assert (await delete_endpoint(conn, "notification")).undelivered == len(events)
    await wait_for(
        lambda: relay.logged("no longer delivering to endpoint") == 1,
        timeout=10,
        what="the lane retired",
    )
    receiver.release()
    deleted = (
        "deliveries deleted while in flight (their endpoint was removed); their results are dropped"
    )
    await wait_for(lambda: relay.logged(deleted) >= 1, timeout=30, what="the results dropped")
    owned = "lease ran out before the result was written; another relay owns it"
    assert relay.logged(owned) == 0, dump_logs([relay])


async def test_the_shutdown_warning_counts_the_claims_whose_answer_was_lost(
    conn: asyncpg.Connection, relays: RelayLauncher
) -> None:
    """Every write to `deliveries` fails: each claim raises (its token kept, to end its leases
    once the database answers), and ending them fails too. Stopped, the relay says how many it
    could not write, the lost claims included."""
    await conn.execute(
        """CREATE FUNCTION refuse_writes() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'deliveries refuse every write'; END $$"""
    )
    await conn.execute(
        """CREATE TRIGGER refuse_writes BEFORE UPDATE ON deliveries FOR EACH STATEMENT
           EXECUTE FUNCTION refuse_writes()"""
    )
    relay = relays.start(relay_shutdown_grace_seconds=1)
    await insert_events(conn, payments=3)
    await wait_for(
        lambda: relay.logged("could not write delivery results; retrying") >= 1,
        timeout=30,
        what="a lost claim's release to fail",
    )
    relay.send(signal.SIGTERM)
    assert await relay.wait_exit(timeout=20) == 0
    (warning,) = [
        r
        for r in relay.log_records()
        if r.get("msg") == "could not write every result before exiting; those leases run out "
        "instead"
    ]
    assert warning["unwritten"] >= 1, warning
