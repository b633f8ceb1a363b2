"""Subscribed endpoints: the core's SQL against a real PostgreSQL: add, change,
pause/enable, rotate a secret, remove, and seeding that never overwrites a changed endpoint."""

from __future__ import annotations

import asyncpg
import pytest

from payment_service import endpoints
from payment_service.config import load_settings
from payment_service.endpoints import EndpointError, EndpointNotFound
from tests.support.database import insert_events

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes, for the tests only


async def test_the_migration_leaves_notification_waiting_for_its_url(
    db: asyncpg.Connection,
) -> None:
    (only,) = await endpoints.select_endpoints(db)
    assert (only.name, only.url, only.event_types, only.state) == (
        "notification",
        None,
        ("*",),
        "ACTIVE",
    )
    assert only.seeded


async def test_seeding_configures_then_never_overwrites(db: asyncpg.Connection) -> None:
    settings = load_settings(
        notification_service_url="http://127.0.0.1:9001",
        trip_callback_path="/trips/payments",
        trip_event_types="payment.succeeded,payment.refunded",
        callback_signing_secret=SECRET,
    )
    assert sorted(await endpoints.seed_from_settings(db, settings)) == ["notification", "trip"]
    trip = await endpoints.select_endpoint(db, "trip")
    assert trip.url == "http://localhost:8081/trips/payments"
    assert trip.event_types == ("payment.succeeded", "payment.refunded")
    assert trip.signing_secrets() == [SECRET]
    notification = await endpoints.select_endpoint(db, "notification")
    assert notification.url == "http://127.0.0.1:9001/notifications"

    # Changed by hand since: seeding with other settings leaves both alone.
    await endpoints.update_endpoint(db, "trip", url="http://127.0.0.1:9002/t")
    other = load_settings(
        notification_service_url="http://127.0.0.1:9999", trip_callback_path="/elsewhere"
    )
    assert await endpoints.seed_from_settings(db, other) == []
    assert (await endpoints.select_endpoint(db, "trip")).url == "http://127.0.0.1:9002/t"
    assert (await endpoints.select_endpoint(db, "notification")).url == (
        "http://127.0.0.1:9001/notifications"
    )


async def test_add_pause_enable_rotate_remove(db: asyncpg.Connection) -> None:
    added = await endpoints.insert_endpoint(
        db, name="driver", url="http://127.0.0.1:9003/cb", event_types=("payment.*",)
    )
    assert added.secret is not None and added.secret.startswith("whsec_")
    assert not added.seeded and added.breaker == "closed"
    with pytest.raises(EndpointError, match="exists already"):
        await endpoints.insert_endpoint(db, name="driver", url="http://127.0.0.1:9003/cb")

    paused = await endpoints.set_state(db, "driver", "PAUSED", reason="maintenance")
    assert (paused.state, paused.state_reason) == ("PAUSED", "maintenance")
    assert (await endpoints.set_state(db, "driver", "ACTIVE")).state == "ACTIVE"

    rotated = await endpoints.rotate_secret(db, "driver")
    assert rotated.signing_secrets() == [rotated.secret, added.secret]
    assert rotated.secret != added.secret

    assert await endpoints.delete_endpoint(db, "driver") == endpoints.Removed(0, 0)
    with pytest.raises(EndpointNotFound):
        await endpoints.select_endpoint(db, "driver")


@pytest.mark.parametrize(
    ("types", "event_type", "expected"),
    [
        (("*",), "payment.refunded", True),
        (("payment.*",), "payment.failed", True),
        (("payment.succeeded",), "payment.succeeded", True),
        (("payment.succeeded", "payment.refunded"), "payment.pending", False),
    ],
)
async def test_sql_and_python_agree_on_what_an_endpoint_wants(
    db: asyncpg.Connection, types: tuple[str, ...], event_type: str, expected: bool
) -> None:
    assert endpoints.wants(types, event_type) is expected
    assert await db.fetchval("SELECT endpoint_wants($1, $2)", list(types), event_type) is expected


@pytest.mark.parametrize(
    "types",
    [(), ("payment.nope",), ("refund.*",), ("",)],
    ids=["none", "unknown", "prefix", "empty"],
)
def test_unknown_event_types_are_refused(types: tuple[str, ...]) -> None:
    with pytest.raises(EndpointError):
        endpoints.check_event_types(types)


@pytest.mark.parametrize("held_by", ["PAUSED", "DISABLED"])
async def test_resume_or_enable_makes_the_endpoints_waiting_deliveries_due_now(
    db: asyncpg.Connection, held_by: str
) -> None:
    trip = await endpoints.insert_endpoint(db, name="trip", url="http://127.0.0.1:9/trips")
    await insert_events(db, payments=3)
    await db.execute("UPDATE deliveries SET next_attempt_at = now() + interval '2 hours'")
    await endpoints.set_state(db, "trip", held_by, reason="test")
    waiting = "SELECT count(*) FROM deliveries WHERE endpoint_id = $1 AND next_attempt_at > now()"
    assert await db.fetchval(waiting, trip.endpoint_id) == 3  # pausing changes no schedule
    await endpoints.set_state(db, "trip", "ACTIVE")
    assert await db.fetchval(waiting, trip.endpoint_id) == 0
    # another endpoint's schedule is its own
    others = await db.fetchval(
        "SELECT count(*) FROM deliveries WHERE endpoint_id <> $1 AND next_attempt_at > now()",
        trip.endpoint_id,
    )
    assert others == 3
