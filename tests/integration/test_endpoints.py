"""Subscribed endpoints: the core's SQL against a real PostgreSQL: add, change,
pause/enable, rotate a secret (every secret replaced in the last day still signs, three at most),
remove, and seeding: endpoints follow the settings until an operator changes them, then each
difference is a warning."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from payment_service import endpoints
from payment_service.config import Settings, load_settings
from payment_service.endpoints import EndpointError, EndpointNotFound
from tests.support.audit import OPERATOR
from tests.support.database import insert_events

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes, for the tests only
OTHER_SECRET = "whsec_" + "b3RoZXItc2VjcmV0LWZvci10ZXN0cy0xMjM0"


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


def seeding_settings(**changes: object) -> Settings:
    values: dict[str, object] = {
        "notification_service_url": "http://127.0.0.1:9001",
        "trip_callback_path": "/trips/payments",
        "trip_event_types": "payment.succeeded,payment.refunded",
        "callback_signing_secret": SECRET,
    }
    return load_settings(**(values | changes))


def actions(notes: list[endpoints.SeedNote]) -> list[tuple[str, str]]:
    return [(note.endpoint, note.action) for note in notes]


async def test_seeding_configures_then_follows_the_settings(db: asyncpg.Connection) -> None:
    notes = await endpoints.seed_from_settings(db, seeding_settings())
    assert actions(notes) == [("notification", "configured"), ("trip", "created")]
    assert not any(note.warning for note in notes)
    trip = await endpoints.select_endpoint(db, "trip")
    assert trip.url == "http://localhost:8081/trips/payments"
    assert trip.event_types == ("payment.succeeded", "payment.refunded")
    assert trip.signing_secrets() == [SECRET]
    notification = await endpoints.select_endpoint(db, "notification")
    assert notification.url == "http://127.0.0.1:9001/notifications"
    assert await endpoints.seed_from_settings(db, seeding_settings()) == []  # nothing to follow

    # The settings change: both endpoints, still as seeding made them, follow.
    moved = seeding_settings(
        notification_service_url="http://127.0.0.1:9999",
        trip_event_types="payment.*",
        callback_signing_secret=OTHER_SECRET,
    )
    notes = await endpoints.seed_from_settings(db, moved)
    assert [note.text for note in notes] == [
        "endpoint notification follows NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH: "
        "url http://127.0.0.1:9001/notifications → http://127.0.0.1:9999/notifications",
        "endpoint notification follows CALLBACK_SIGNING_SECRET: "
        "secret replaced (the one replaced signs for 24 h more)",
        "endpoint trip follows TRIP_EVENT_TYPES: "
        "event types payment.succeeded,payment.refunded → payment.*",
        "endpoint trip follows CALLBACK_SIGNING_SECRET: "
        "secret replaced (the one replaced signs for 24 h more)",
    ]
    notification = await endpoints.select_endpoint(db, "notification")
    assert notification.url == "http://127.0.0.1:9999/notifications"
    assert notification.seeded
    # a new CALLBACK_SIGNING_SECRET is a rotation: the old one signs for a day more
    assert notification.signing_secrets() == [OTHER_SECRET, SECRET]
    trip = await endpoints.select_endpoint(db, "trip")
    assert (trip.event_types, trip.signing_secrets()) == (("payment.*",), [OTHER_SECRET, SECRET])

    # CALLBACK_SIGNING_SECRET unset: unsigned at once (no replaced secret signs on)
    unsigned = await endpoints.seed_from_settings(
        db, moved.model_copy(update={"callback_signing_secret": None})
    )
    assert [note.text.partition(": ")[2] for note in unsigned] == [
        "secret removed: callbacks are unsigned"
    ] * 2
    assert (await endpoints.select_endpoint(db, "trip")).signing_secrets() == []


async def test_an_endpoint_changed_by_hand_stays_and_each_difference_is_a_warning(
    db: asyncpg.Connection,
) -> None:
    await endpoints.seed_from_settings(db, seeding_settings())
    await endpoints.update_endpoint(db, "trip", url="http://127.0.0.1:9002/t", operator=OPERATOR)
    await endpoints.rotate_secret(db, "notification", secret=OTHER_SECRET, operator=OPERATOR)
    before = await endpoints.select_endpoints(db)
    assert not any(endpoint.seeded for endpoint in before)

    notes = await endpoints.seed_from_settings(
        db, seeding_settings(trip_event_types="payment.failed")
    )
    assert actions(notes) == [("notification", "differs"), ("trip", "differs"), ("trip", "differs")]
    assert all(note.warning for note in notes)
    assert [note.text for note in notes] == [
        "endpoint notification differs from CALLBACK_SIGNING_SECRET: it signs with another "
        "secret (set by an operator; `payment-service endpoints rotate-secret notification "
        "--secret …` to change it)",
        "endpoint trip differs from TRIP_SERVICE_URL + TRIP_CALLBACK_PATH: url "
        "http://127.0.0.1:9002/t, the settings say http://localhost:8081/trips/payments (set by "
        "an operator; `payment-service endpoints update trip --url …` to change it)",
        "endpoint trip differs from TRIP_EVENT_TYPES: event types "
        "payment.succeeded,payment.refunded, the settings say payment.failed (set by an "
        "operator; `payment-service endpoints update trip --events …` to change it)",
    ]
    assert all(SECRET not in note.text and OTHER_SECRET not in note.text for note in notes)
    after = await endpoints.select_endpoints(db)
    assert [(e.url, e.event_types, e.secret, e.updated_at) for e in after] == [
        (e.url, e.event_types, e.secret, e.updated_at) for e in before
    ]


async def test_seeding_shows_a_url_no_check_let_in_without_its_password_and_goes_on(
    db: asyncpg.Connection,
) -> None:
    """A row written by hand (or by an older version), which the relay DISABLEs: seeding warns
    about it, its password not shown, rather than stopping `migrate`, `run` and every relay
    start on a URL it cannot parse."""
    await endpoints.seed_from_settings(db, seeding_settings())
    await db.execute(
        "UPDATE endpoints SET url = 'http://ops:pa55@[::1/n', seeded = false"
        " WHERE name = 'notification'"
    )
    notes = await endpoints.seed_from_settings(db, seeding_settings())
    assert [note.text for note in notes] == [
        "endpoint notification differs from NOTIFICATION_SERVICE_URL + NOTIFICATION_CALLBACK_PATH: "
        "url http://[::1/n, the settings say http://127.0.0.1:9001/notifications (set by an "
        "operator; `payment-service endpoints update notification --url …` to change it)"
    ]


async def test_a_seeded_endpoint_whose_callback_path_went_stays_with_a_warning(
    db: asyncpg.Connection,
) -> None:
    await endpoints.seed_from_settings(db, seeding_settings())
    notes = await endpoints.seed_from_settings(db, seeding_settings(trip_callback_path=None))
    assert [(note.action, note.warning, note.text) for note in notes] == [
        (
            "left",
            True,
            "endpoint trip was seeded from TRIP_CALLBACK_PATH, which is not set now: it stays as "
            "it is (`payment-service endpoints remove trip --yes` removes it)",
        )
    ]
    assert (await endpoints.select_endpoint(db, "trip")).url is not None


async def test_seeding_from_many_processes_at_once_follows_once(database_url: str) -> None:
    connections = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        await endpoints.seed_from_settings(connections[0], seeding_settings())
        moved = seeding_settings(
            notification_service_url="http://127.0.0.1:9999", callback_signing_secret=OTHER_SECRET
        )
        results = await asyncio.gather(
            *(endpoints.seed_from_settings(conn, moved) for conn in connections)
        )
        done = sorted(note for notes in results for note in actions(notes))
        assert done == sorted([("notification", "followed")] * 2 + [("trip", "followed")]), results
        notification = await endpoints.select_endpoint(connections[0], "notification")
        assert notification.signing_secrets() == [OTHER_SECRET, SECRET]
    finally:
        for conn in connections:
            await conn.close()


async def test_add_pause_enable_rotate_remove(db: asyncpg.Connection) -> None:
    added = await endpoints.insert_endpoint(
        db,
        name="driver",
        url="http://127.0.0.1:9003/cb",
        event_types=("payment.*",),
        operator=OPERATOR,
    )
    assert added.secret is not None and added.secret.startswith("whsec_")
    assert not added.seeded and added.breaker == "closed"
    with pytest.raises(EndpointError, match="exists already"):
        await endpoints.insert_endpoint(
            db, name="driver", url="http://127.0.0.1:9003/cb", operator=OPERATOR
        )

    paused = await endpoints.set_state(
        db, "driver", "PAUSED", reason="maintenance", operator=OPERATOR
    )
    assert (paused.state, paused.state_reason) == ("PAUSED", "maintenance")
    assert (await endpoints.set_state(db, "driver", "ACTIVE", operator=OPERATOR)).state == "ACTIVE"

    rotated = await endpoints.rotate_secret(db, "driver", operator=OPERATOR)
    assert rotated.signing_secrets() == [rotated.secret, added.secret]
    assert rotated.secret != added.secret

    assert await endpoints.delete_endpoint(db, "driver", operator=OPERATOR) == endpoints.Removed(
        0, 0
    )
    with pytest.raises(EndpointNotFound):
        await endpoints.select_endpoint(db, "driver")


async def test_rotating_twice_in_a_day_keeps_both_replaced_secrets_signing(
    db: asyncpg.Connection,
) -> None:
    first = await endpoints.insert_endpoint(
        db, name="trip", url="http://127.0.0.1:9/t", operator=OPERATOR
    )
    second = await endpoints.rotate_secret(db, "trip", operator=OPERATOR)
    third = await endpoints.rotate_secret(
        db, "trip", operator=OPERATOR
    )  # a retry, an hour later, say
    assert third.signing_secrets() == [third.secret, second.secret, first.secret]
    assert len({first.secret, second.secret, third.secret}) == 3

    # what the admin API and `list --json` show: when each replaced secret stops, never a secret
    shown = third.public()
    expiries = shown["previous_secrets_expire_at"]
    assert len(expiries) == 2 and expiries == sorted(expiries, reverse=True), expiries
    text = repr(shown)
    assert all(secret not in text for secret in third.signing_secrets())

    # a fourth secret: three in all at most, the oldest goes
    fourth = await endpoints.rotate_secret(db, "trip", operator=OPERATOR)
    assert fourth.signing_secrets() == [fourth.secret, third.secret, second.secret]


async def test_a_replaced_secret_signs_until_it_expires(db: asyncpg.Connection) -> None:
    first = await endpoints.insert_endpoint(
        db, name="trip", url="http://127.0.0.1:9/t", operator=OPERATOR
    )
    middle = await endpoints.rotate_secret(
        db, "trip", keep_previous_seconds=3600, operator=OPERATOR
    )
    second = await endpoints.rotate_secret(
        db, "trip", keep_previous_seconds=7200, operator=OPERATOR
    )
    assert second.signing_secrets() == [second.secret, middle.secret, first.secret]
    # a day later for the oldest: its expiry has passed (moved back, rather than waited for)
    await db.execute(
        """UPDATE endpoints
              SET previous_secrets = jsonb_set(previous_secrets, '{1,expires_at}',
                                               to_jsonb(now() - interval '1 second'))
            WHERE name = 'trip'"""
    )
    later = await endpoints.select_endpoint(db, "trip")
    assert later.signing_secrets() == [second.secret, middle.secret]
    assert len(later.public()["previous_secrets_expire_at"]) == 1
    # the next rotation drops the expired secret from the row
    third = await endpoints.rotate_secret(db, "trip", operator=OPERATOR)
    assert [p.secret for p in third.previous_secrets] == [second.secret, middle.secret]


async def test_an_unsigned_endpoint_rotated_gets_a_secret_and_nothing_to_keep(
    db: asyncpg.Connection,
) -> None:
    await endpoints.insert_endpoint(db, name="trip", url="http://127.0.0.1:9/t", operator=OPERATOR)
    await db.execute("UPDATE endpoints SET secret = NULL WHERE name = 'trip'")
    rotated = await endpoints.rotate_secret(db, "trip", operator=OPERATOR)
    assert rotated.signing_secrets() == [rotated.secret] and rotated.previous_secrets == ()


async def test_rotating_to_a_secret_still_signing_keeps_it_once(db: asyncpg.Connection) -> None:
    first = await endpoints.insert_endpoint(
        db, name="trip", url="http://127.0.0.1:9/t", operator=OPERATOR
    )
    second = await endpoints.rotate_secret(db, "trip", operator=OPERATOR)
    assert first.secret is not None
    back = await endpoints.rotate_secret(
        db, "trip", secret=first.secret, operator=OPERATOR
    )  # undo the rotation
    assert back.signing_secrets() == [first.secret, second.secret]


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
    [(), ("payment.nope",), ("charge.*",), ("",)],
    ids=["none", "unknown", "prefix", "empty"],
)
def test_unknown_event_types_are_refused(types: tuple[str, ...]) -> None:
    with pytest.raises(EndpointError):
        endpoints.check_event_types(types)


@pytest.mark.parametrize("held_by", ["PAUSED", "DISABLED"])
async def test_resume_or_enable_makes_the_endpoints_waiting_deliveries_due_now(
    db: asyncpg.Connection, held_by: str
) -> None:
    trip = await endpoints.insert_endpoint(
        db, name="trip", url="http://127.0.0.1:9/trips", operator=OPERATOR
    )
    await insert_events(db, payments=3)
    await db.execute("UPDATE deliveries SET next_attempt_at = now() + interval '2 hours'")
    await endpoints.set_state(db, "trip", held_by, reason="test", operator=OPERATOR)
    waiting = "SELECT count(*) FROM deliveries WHERE endpoint_id = $1 AND next_attempt_at > now()"
    assert await db.fetchval(waiting, trip.endpoint_id) == 3  # pausing changes no schedule
    await endpoints.set_state(db, "trip", "ACTIVE", operator=OPERATOR)
    assert await db.fetchval(waiting, trip.endpoint_id) == 0
    # another endpoint's schedule is its own
    others = await db.fetchval(
        "SELECT count(*) FROM deliveries WHERE endpoint_id <> $1 AND next_attempt_at > now()",
        trip.endpoint_id,
    )
    assert others == 3
