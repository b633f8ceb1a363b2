"""The admin API (issue 11): `/admin/endpoints…` and `GET /admin/events/{event_id}/
deliveries` behind ADMIN_API_KEYS (404 when unset, 401 without an admin key), problem+json errors,
secrets shown only when added or rotated, changes that the API's next write sees at once, and the
OpenAPI document that says all that. The real app over HTTP against a real PostgreSQL."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from app.admin import EndpointDocument, EndpointWithSecret, EventDeliveries
from payment_service import endpoints
from tests.integration.conftest import ApiFactory
from tests.support.api import RunningApi, assert_problem, create_payment

JSON = "application/json"
ADMIN_TOKEN = "admin-token-for-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # 24 bytes, for the tests only
OTHER_SECRET = "whsec_" + "c2Vjb25kLXRlc3Qtc2VjcmV0LW9ubHktMjdi"  # 27 bytes, for the tests only

# Every admin route, with a body where it takes one.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/admin/endpoints", None),
    ("POST", "/admin/endpoints", {"name": "trip", "url": "http://127.0.0.1:9/t"}),
    ("GET", "/admin/endpoints/notification", None),
    ("PATCH", "/admin/endpoints/notification", {"url": "http://127.0.0.1:9/n"}),
    ("DELETE", "/admin/endpoints/notification", None),
    ("POST", "/admin/endpoints/notification/pause", None),
    ("POST", "/admin/endpoints/notification/resume", None),
    ("POST", "/admin/endpoints/notification/disable", None),
    ("POST", "/admin/endpoints/notification/enable", None),
    ("POST", "/admin/endpoints/notification/rotate-secret", None),
    ("GET", "/admin/events/6c5b64b1-9c49-4a45-8f3a-8c4e5b8e2f10/deliveries", None),
    ("GET", "/admin/audit", None),
    ("GET", "/admin/deliveries/dead", None),
    ("POST", "/admin/deliveries/replay-dead", None),
    ("GET", "/admin/endpoints/notification/replay?since=2025-01-01T00:00:00Z", None),
    ("POST", "/admin/endpoints/notification/replay", {"since": "2025-01-01T00:00:00Z"}),
]


@pytest.fixture
async def admin_api(api_factory: ApiFactory) -> RunningApi:
    return await api_factory(admin_api_keys=(f"ops:{ADMIN_TOKEN}",))


@pytest.fixture
def admin(admin_api: RunningApi) -> httpx.AsyncClient:
    """A client of the admin API that sends the admin key."""
    return admin_api.new_client(headers=ADMIN)


async def send(
    client: httpx.AsyncClient, method: str, path: str, body: Any = None
) -> httpx.Response:
    return await client.request(method, path, json=body)


def names(listing: httpx.Response) -> list[str]:
    assert listing.status_code == 200, listing.text
    return [endpoint["name"] for endpoint in listing.json()["data"]]


# -- 404 when unset, 401 without the admin key --------------------------------------------------
async def test_without_admin_keys_every_admin_route_is_absent(
    client: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    for method, path, body in ROUTES:
        response = await send(client, method, path, body)
        assert_problem(response, 404, "NOT_FOUND")
        response = await client.request(method, path, json=body, headers=ADMIN)
        assert_problem(response, 404, "NOT_FOUND")
    document = (await client.get("/openapi.json")).json()
    assert not [path for path in document["paths"] if "/admin" in path]
    # Nothing was changed.
    assert await db.fetchval("SELECT count(*) FROM endpoints") == 1


async def test_admin_routes_need_an_admin_key(
    api_factory: ApiFactory, db: asyncpg.Connection
) -> None:
    api = await api_factory(admin_api_keys=(f"ops:{ADMIN_TOKEN}",), api_keys=("app:app-token",))
    wrong = [
        {},
        {"Authorization": "Bearer not-the-token"},
        {"Authorization": "Bearer app-token"},  # an API_KEYS key is no admin key
        {"Authorization": ADMIN_TOKEN},  # no scheme
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
    ]
    for method, path, body in ROUTES:
        for headers in wrong:
            response = await api.client.request(method, path, json=body, headers=headers)
            assert_problem(response, 401, "UNAUTHORIZED")
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert ADMIN_TOKEN not in response.text
    assert await db.fetchval("SELECT count(*) FROM endpoints") == 1
    # ... and an admin key is no API key.
    response = await api.client.get("/payments", headers=ADMIN)
    assert_problem(response, 401, "UNAUTHORIZED")
    listing = await api.client.get("/admin/endpoints", headers=ADMIN)
    assert names(listing) == ["notification"]


async def test_admin_routes_live_under_the_api_prefix(api_factory: ApiFactory) -> None:
    api = await api_factory(admin_api_keys=(f"ops:{ADMIN_TOKEN}",), api_prefix="/v1")
    assert names(await api.client.get("/v1/admin/endpoints", headers=ADMIN)) == ["notification"]
    assert_problem(await api.client.get("/admin/endpoints", headers=ADMIN), 404)


# -- endpoints -----------------------------------------------------------------------------------
async def test_add_then_list_and_show_without_the_secret(admin: httpx.AsyncClient) -> None:
    added = await admin.post(
        "/admin/endpoints",
        json={
            "name": "trip",
            "url": "http://127.0.0.1:9/trips",
            "event_types": ["payment.succeeded", "payment.refunded"],
        },
    )

    assert added.status_code == 201, added.text
    body = EndpointWithSecret.model_validate(added.json())
    assert (body.name, body.url, body.event_types) == (
        "trip",
        "http://127.0.0.1:9/trips",
        ["payment.succeeded", "payment.refunded"],
    )
    assert (body.state, body.breaker, body.signed, body.seeded) == ("ACTIVE", "closed", True, False)
    assert body.secret.startswith("whsec_") and len(body.secret) > 40, "generated"

    listing = await admin.get("/admin/endpoints")
    assert names(listing) == ["notification", "trip"]
    shown = await admin.get("/admin/endpoints/trip")
    assert shown.status_code == 200, shown.text
    assert EndpointDocument.model_validate(shown.json()).url == "http://127.0.0.1:9/trips"
    for document in [*listing.json()["data"], shown.json()]:
        assert not {"secret", "previous_secret", "previous_secrets"} & set(document), document
    assert body.secret not in listing.text + shown.text


async def test_add_with_a_given_secret_and_every_type_by_default(admin: httpx.AsyncClient) -> None:
    added = await admin.post(
        "/admin/endpoints",
        json={"name": "driver", "url": "https://127.0.0.1:9/d", "secret": SECRET},
    )
    assert added.status_code == 201, added.text
    assert added.json()["secret"] == SECRET
    assert added.json()["event_types"] == ["*"]


async def test_add_refusals(admin: httpx.AsyncClient) -> None:
    base = {"name": "trip", "url": "http://127.0.0.1:9/t"}
    invalid = [
        ({**base, "name": "Trip"}, "name"),
        ({**base, "name": "x" * 64}, "name"),
        ({**base, "name": 7}, "name"),
        ({**base, "url": "ftp://127.0.0.1/t"}, "url"),
        ({**base, "url": "http://127.0.0.1/a b"}, "url"),
        ({**base, "url": "http://127.0.0.1/\u0000"}, "url"),
        ({**base, "url": "http:///path-only"}, "url"),
        ({**base, "event_types": []}, "event_types"),
        ({**base, "event_types": ["payment.created"]}, "event_types"),
        ({**base, "secret": "not-a-secret"}, "secret"),
        ({**base, "secret": "whsec_" + "A" * 31}, "secret"),
        ({**base, "colour": "red"}, "colour"),
        ({"url": "http://127.0.0.1:9/t"}, "name"),
    ]
    for body, field in invalid:
        problem = assert_problem(
            await admin.post("/admin/endpoints", json=body), 400, "VALIDATION_ERROR"
        )
        assert field in {error["field"] for error in problem["errors"]}, (body, problem)
    assert_problem(
        await admin.post("/admin/endpoints", content=b"{", headers={"Content-Type": JSON}), 400
    )
    assert_problem(await admin.post("/admin/endpoints", content=b"{}"), 415)

    assert (await admin.post("/admin/endpoints", json=base)).status_code == 201
    again = await admin.post("/admin/endpoints", json={**base, "url": "http://127.0.0.1:9/other"})
    assert_problem(again, 409, "ENDPOINT_EXISTS")
    shown = await admin.get("/admin/endpoints/trip")
    assert shown.json()["url"] == "http://127.0.0.1:9/t", "the existing one is unchanged"


async def test_update_pause_resume_disable_enable(admin: httpx.AsyncClient) -> None:
    await admin.post("/admin/endpoints", json={"name": "trip", "url": "http://127.0.0.1:9/t"})

    changed = await admin.patch(
        "/admin/endpoints/trip",
        json={"url": "http://127.0.0.1:9/new", "event_types": ["payment.*"]},
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["url"], changed.json()["event_types"]) == (
        "http://127.0.0.1:9/new",
        ["payment.*"],
    )
    only_types = await admin.patch("/admin/endpoints/trip", json={"event_types": ["*"]})
    assert only_types.json()["url"] == "http://127.0.0.1:9/new", "what is not given stays"
    for body, field in (({}, "body"), ({"url": "nope"}, "url"), ({"name": "x"}, "name")):
        problem = assert_problem(
            await admin.patch("/admin/endpoints/trip", json=body), 400, "VALIDATION_ERROR"
        )
        assert field in {error["field"] for error in problem["errors"]}, problem

    for action, state, reason in (
        ("pause", "PAUSED", "paused by admin:ops"),
        ("resume", "ACTIVE", None),
        ("disable", "DISABLED", "disabled by admin:ops"),
        ("enable", "ACTIVE", None),
    ):
        response = await admin.post(f"/admin/endpoints/trip/{action}")
        assert response.status_code == 200, response.text
        document = EndpointDocument.model_validate(response.json())
        assert (document.state, document.state_reason) == (state, reason), action
        assert (await admin.get("/admin/endpoints/trip")).json()["state"] == state


async def test_rotate_secret_answers_the_new_one_and_keeps_the_old_valid(
    admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await admin.post(
        "/admin/endpoints", json={"name": "trip", "url": "http://127.0.0.1:9/t", "secret": SECRET}
    )

    generated = await admin.post("/admin/endpoints/trip/rotate-secret")
    assert generated.status_code == 200, generated.text
    rotated = EndpointWithSecret.model_validate(generated.json())
    assert rotated.secret.startswith("whsec_") and rotated.secret != SECRET
    assert len(rotated.previous_secrets_expire_at) == 1, "the old secret signs for a while"
    assert (await endpoints.select_endpoint(db, "trip")).signing_secrets() == [
        rotated.secret,
        SECRET,
    ]

    given = await admin.post("/admin/endpoints/trip/rotate-secret", json={"secret": OTHER_SECRET})
    assert given.status_code == 200, given.text
    assert given.json()["secret"] == OTHER_SECRET
    # a second rotation within the day: both replaced secrets still sign, newest first
    twice = EndpointDocument.model_validate((await admin.get("/admin/endpoints/trip")).json())
    assert len(twice.previous_secrets_expire_at) == 2
    assert twice.previous_secrets_expire_at == sorted(twice.previous_secrets_expire_at)[::-1]
    assert (await endpoints.select_endpoint(db, "trip")).signing_secrets() == [
        OTHER_SECRET,
        rotated.secret,
        SECRET,
    ]
    assert rotated.secret not in (await admin.get("/admin/endpoints/trip")).text

    refused = await admin.post("/admin/endpoints/trip/rotate-secret", json={"secret": "plain"})
    assert_problem(refused, 400, "VALIDATION_ERROR")


async def test_unknown_endpoints_are_404(admin: httpx.AsyncClient) -> None:
    for method, path, body in ROUTES:
        if "/admin/endpoints/" not in path:
            continue
        unknown = path.replace("/notification", "/no-such-endpoint")
        assert_problem(await send(admin, method, unknown, body), 404, "ENDPOINT_NOT_FOUND")
        # A name no endpoint can have names no resource at all.
        odd = path.replace("/notification", "/No%20Such%00")
        assert_problem(await send(admin, method, odd, body), 404)


async def test_remove_deletes_the_endpoint_and_its_deliveries(
    admin_api: RunningApi, admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await admin.post("/admin/endpoints", json={"name": "trip", "url": "http://127.0.0.1:9/t"})
    await create_payment(admin_api.client, method="CARD")
    await create_payment(admin_api.client, method="CARD")

    removed = await admin.delete("/admin/endpoints/trip")

    assert removed.status_code == 200, removed.text
    assert removed.json() == {
        "name": "trip",
        "removed": True,
        "undelivered_removed": 2,
        "delivered_kept": 0,
    }
    assert_problem(await admin.get("/admin/endpoints/trip"), 404, "ENDPOINT_NOT_FOUND")
    assert await db.fetchval("SELECT count(*) FROM deliveries") == 2, "notification's stay"


async def test_changes_reach_the_apis_next_write_at_once(
    admin_api: RunningApi, admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    async def endpoints_of_next_payment() -> list[str]:
        payment = await create_payment(admin_api.client, method="CARD")
        rows = await db.fetch(
            "SELECT n.name FROM deliveries AS d JOIN endpoints AS n USING (endpoint_id)"
            " WHERE d.aggregate_id = $1 ORDER BY n.name",
            payment["payment_id"],
        )
        return [row["name"] for row in rows]

    await admin.post(
        "/admin/endpoints",
        json={"name": "trip", "url": "http://127.0.0.1:9/t", "event_types": ["payment.pending"]},
    )
    assert await endpoints_of_next_payment() == ["notification"]
    await admin.patch("/admin/endpoints/trip", json={"event_types": ["payment.succeeded"]})
    assert await endpoints_of_next_payment() == ["notification", "trip"]
    await admin.post("/admin/endpoints/trip/pause")
    assert await endpoints_of_next_payment() == ["notification", "trip"]
    await admin.post("/admin/endpoints/trip/disable")
    assert await endpoints_of_next_payment() == ["notification"]
    await admin.post("/admin/endpoints/trip/enable")
    assert await endpoints_of_next_payment() == ["notification", "trip"]


# -- an event's deliveries -----------------------------------------------------------------------
async def test_event_deliveries_show_every_attempt(
    admin_api: RunningApi, admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    await admin.post("/admin/endpoints", json={"name": "trip", "url": "http://127.0.0.1:9/t"})
    payment = await create_payment(admin_api.client, method="CARD")
    event_id = await db.fetchval(
        "SELECT event_id FROM outbox_events WHERE aggregate_id = $1", payment["payment_id"]
    )
    # Two attempts at `trip` as the relay records them: a 503, then a 200.
    await db.execute(
        """
        UPDATE deliveries AS d
           SET status = 'DELIVERED', attempts = 2, counted_attempts = 2,
               last_status_code = 200, last_error = NULL,
               last_attempt_at = '2026-01-02T03:04:06+00', delivered_at = '2026-01-02T03:04:06+00',
               attempt_log = '[{"attempt": 1, "at": "2026-01-02T03:04:05+00:00",
                                "outcome": "PENDING", "status_code": 503,
                                "error": "HTTP 503", "tries": 3, "duration_ms": 41},
                               {"attempt": 2, "at": "2026-01-02T03:04:06+00:00",
                                "outcome": "DELIVERED", "status_code": 200,
                                "error": null, "tries": 1, "duration_ms": 7}]'
          FROM endpoints AS n
         WHERE n.endpoint_id = d.endpoint_id AND n.name = 'trip'
        """
    )

    response = await admin.get(f"/admin/events/{event_id}/deliveries")

    assert response.status_code == 200, response.text
    document = EventDeliveries.model_validate(response.json())
    assert (document.event_id, document.event_type, document.payment_id) == (
        event_id,
        "payment.succeeded",
        payment["payment_id"],
    )
    waiting, delivered = document.deliveries
    assert (waiting.endpoint, waiting.status, waiting.attempts, waiting.attempt_log) == (
        "notification",
        "PENDING",
        0,
        [],
    )
    assert waiting.next_attempt_at is not None
    assert (delivered.endpoint, delivered.status, delivered.attempts) == ("trip", "DELIVERED", 2)
    assert delivered.next_attempt_at is None
    assert [
        (a.attempt, a.at.isoformat(), a.outcome, a.status_code, a.error, a.duration_ms)
        for a in delivered.attempt_log
    ] == [
        (1, "2026-01-02T03:04:05+00:00", "PENDING", 503, "HTTP 503", 41),
        (2, "2026-01-02T03:04:06+00:00", "DELIVERED", 200, None, 7),
    ]
    # The same answer for the id written in upper case (a UUID is a UUID).
    upper = await admin.get(f"/admin/events/{str(event_id).upper()}/deliveries")
    assert upper.json() == response.json()


async def test_unknown_or_malformed_event_ids_are_404(admin: httpx.AsyncClient) -> None:
    unknown = await admin.get("/admin/events/6c5b64b1-9c49-4a45-8f3a-8c4e5b8e2f10/deliveries")
    assert_problem(unknown, 404, "EVENT_NOT_FOUND")
    for odd in ("1", "not-a-uuid", "6c5b64b1-9c49-4a45-8f3a-8c4e5b8e2f1"):
        assert_problem(await admin.get(f"/admin/events/{odd}/deliveries"), 404)


# -- the OpenAPI document ------------------------------------------------------------------------
async def test_openapi_documents_the_admin_routes_behind_their_own_key(
    admin_api: RunningApi,
) -> None:
    document = (await admin_api.client.get("/openapi.json")).json()

    admin_paths = {path: ops for path, ops in document["paths"].items() if "/admin" in path}
    documented = {(method.upper(), path) for path, ops in admin_paths.items() for method in ops}
    assert documented == {
        ("GET", "/admin/endpoints"),
        ("POST", "/admin/endpoints"),
        ("GET", "/admin/endpoints/{name}"),
        ("PATCH", "/admin/endpoints/{name}"),
        ("DELETE", "/admin/endpoints/{name}"),
        ("POST", "/admin/endpoints/{name}/pause"),
        ("POST", "/admin/endpoints/{name}/resume"),
        ("POST", "/admin/endpoints/{name}/disable"),
        ("POST", "/admin/endpoints/{name}/enable"),
        ("POST", "/admin/endpoints/{name}/rotate-secret"),
        ("GET", "/admin/events/{event_id}/deliveries"),
        ("GET", "/admin/audit"),
        ("GET", "/admin/deliveries/dead"),
        ("POST", "/admin/deliveries/replay-dead"),
        ("GET", "/admin/endpoints/{name}/replay"),
        ("POST", "/admin/endpoints/{name}/replay"),
        ("POST", "/admin/payments/{payment_id}/settlement"),
    }
    assert document["components"]["securitySchemes"]["admin"] == {
        "type": "http",
        "scheme": "bearer",
    }
    for path, ops in admin_paths.items():
        for method, operation in ops.items():
            label = f"{method} {path}"
            assert operation["security"] == [{"admin": []}], f"{label} is not open"
            # Only a payment's settlement takes a key: the endpoints' changes are idempotent.
            keyed = "Idempotency-Key" in {p["name"] for p in operation.get("parameters", [])}
            assert keyed == path.startswith("/admin/payments/"), label
            assert "401" in operation["responses"], label
            problem = operation["responses"]["401"]["content"]
            assert list(problem) == ["application/problem+json"], label
    create = admin_paths["/admin/endpoints"]["post"]
    assert create["requestBody"]["required"] is True
    assert "201" in create["responses"] and "409" in create["responses"]
    rotate = admin_paths["/admin/endpoints/{name}/rotate-secret"]["post"]
    assert rotate["requestBody"]["required"] is False
    # The payment routes keep their own (absent) scheme: API_KEYS is unset here.
    assert document["paths"]["/payments"]["post"].get("security") != [{"admin": []}]
