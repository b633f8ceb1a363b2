"""No endpoint can stop delivery: an endpoint the relay cannot deliver to (a URL no request can be
made to, written straight into the table as an older version or a hand could) is DISABLED with
the reason, logged and counted, and every other endpoint is delivered. And where callbacks may
go: under the production policy a loopback receiver is refused at delivery time, each refusal a
failed attempt with a clear error. Real relay processes, real receivers on 127.0.0.1, a real
PostgreSQL."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from payment_service.embedded import free_port
from payment_service.endpoints import (
    EndpointError,
    enable,
    insert_endpoint,
    select_endpoint,
    select_endpoints,
)
from tests.support.database import DELIVERY_ROWS, insert_events, recorded, status_counts
from tests.support.environment import SECRET
from tests.support.metrics import sample_value
from tests.support.processes import RelayLauncher, dump_logs
from tests.support.receiver import Receiver
from tests.support.waiting import wait_for

# Each URL shape the admin API and the command line used to accept and that stopped the relay's
# endpoint loop on every start, with what its state_reason names.
UNSERVABLE = {
    "bad-port": ("http://127.0.0.1:99999/cb", "port '99999' is not a number from 1 to 65535"),
    "no-host": ("http://:8097/cb", "no host"),
    "raw-path": ("http://127.0.0.1:8097/caf\u00e9", "percent-encode it (e.g. %C3%A9)"),
    "cjk-path": ("http://127.0.0.1:8097/\u96fb\u5b50", "percent-encode it"),
    "bracket": ("http://[::1/cb", "broken IPv6 address"),
    "bracket-end": ("http://::1]:8097/cb", "broken IPv6 address"),
}


async def test_an_endpoint_the_relay_cannot_deliver_to_is_disabled_and_the_others_are_delivered(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    trip = await Receiver(path="/trip").start()
    try:
        await insert_endpoint(conn, name="trip", url=trip.base_url + "/trip")
        for name, (url, _reason) in UNSERVABLE.items():
            await conn.execute("INSERT INTO endpoints (name, url) VALUES ($1, $2)", name, url)
        events = await insert_events(conn, payments=20, events_per_payment=2)
        ids = {e.event_id for e in events}
        port = free_port()
        relay = relays.start(relay_metrics_port=port)

        await wait_for(
            lambda: ids <= receiver.accepted_ids() and ids <= trip.accepted_ids(),
            timeout=60,
            what="every event at notification and trip, beside the unservable endpoints",
        )
        await recorded(conn, {"DELIVERED": len(ids)}, "notification")
        await recorded(conn, {"DELIVERED": len(ids)}, "trip")

        async def all_disabled() -> bool:
            found = {e.name: e for e in await select_endpoints(conn)}
            return all(found[name].state == "DISABLED" for name in UNSERVABLE)

        await wait_for(all_disabled, timeout=30, what="every unservable endpoint DISABLED")
        for name, (_url, words) in UNSERVABLE.items():
            endpoint = await select_endpoint(conn, name)
            assert endpoint.state_reason is not None
            assert endpoint.state_reason.startswith("the relay cannot deliver to its URL: ")
            assert words in endpoint.state_reason, (name, endpoint.state_reason)
            # its deliveries are kept for when its URL is fixed and it is enabled
            assert await status_counts(conn, name) == {"PENDING": len(ids)}

        disabled = [
            r for r in relay.log_records() if r["msg"] == "endpoint disabled: the relay cannot "
            "deliver to it"
        ]  # fmt: skip
        assert sorted(r["endpoint"] for r in disabled) == sorted(UNSERVABLE), dump_logs([relay])
        assert all(r["level"] == "ERROR" for r in disabled)
        assert relay.logged("relay loop crashed; it restarts after a delay") == 0
        async with httpx.AsyncClient(trust_env=False) as http:
            scraped = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        for name in UNSERVABLE:
            counted = sample_value(scraped, "relay_unservable_endpoints_total", endpoint=name)
            assert counted == 1, (name, scraped)

        # Enabling one as it is would only see it disabled again: the URL must change first.
        with pytest.raises(EndpointError, match=r"cannot deliver to \(port '99999'"):
            await enable(conn, "bad-port")
        assert (await select_endpoint(conn, "bad-port")).state == "DISABLED"

        # The relay goes on: events written now reach the healthy endpoints too.
        later = {e.event_id for e in await insert_events(conn, payments=5)}
        await wait_for(
            lambda: later <= receiver.accepted_ids() and later <= trip.accepted_ids(),
            timeout=30,
            what="later events at the healthy endpoints",
        )
        assert relay.process is not None and relay.process.poll() is None, dump_logs([relay])
    finally:
        await trip.close()


async def test_production_refuses_a_loopback_receiver_at_delivery_time(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    """The receiver is seeded from NOTIFICATION_SERVICE_URL (127.0.0.1): production refuses it on
    every attempt, with a clear error, and nothing reaches it."""
    relay = relays.start(
        environment="production",
        api_keys="relay-tests:a-token-for-tests-only",
        callback_signing_secret=SECRET,
        gateway="none",
        relay_retry_schedule="0.2",
        relay_max_attempts=50,
    )
    events = await insert_events(conn, payments=2)

    async def refused_twice() -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"SELECT status, attempts, last_error, last_status_code FROM {DELIVERY_ROWS}"
            " WHERE event_id = $1::uuid AND attempts >= 2",
            events[0].event_id,
        )

    row = await wait_for(refused_twice, timeout=30, what="attempts refused")
    assert row["status"] == "PENDING" and row["last_status_code"] is None
    assert row["last_error"] == (
        "connection error: 127.0.0.1 is a loopback address, where callbacks may not go: list "
        "its network in ENDPOINT_ALLOWED_NETWORKS to allow it"
    ), dump_logs([relay])
    assert receiver.deliveries == [], "nothing reached the refused address"


async def test_production_delivers_to_a_loopback_receiver_its_settings_list(
    conn: asyncpg.Connection, receiver: Receiver, relays: RelayLauncher
) -> None:
    relays.start(
        environment="production",
        api_keys="relay-tests:a-token-for-tests-only",
        callback_signing_secret=SECRET,
        gateway="none",
        endpoint_allowed_networks="127.0.0.0/8,::1",
    )
    ids = {e.event_id for e in await insert_events(conn, payments=3)}
    await wait_for(lambda: ids <= receiver.accepted_ids(), timeout=30, what="every event")
