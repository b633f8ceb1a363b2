"""The operator console over HTTP (the browser tests drive it in a real Chromium): absent without
ADMIN_API_KEYS, signed in with an admin key into a short-lived signed cookie, every action refused
without a session or without its CSRF token, every action audited as `console:<key name>`, a new
secret shown once, everything from outside rendered as text, and the pages' security headers.
The real app served over HTTP against a real PostgreSQL."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest

from payment_service import endpoints
from payment_service.signing import fingerprint, secret_key
from tests.integration.conftest import ApiFactory
from tests.support.api import RunningApi, payment_body, post_json
from tests.support.audit import OPERATOR, audit_rows, audit_text
from tests.support.console import CONSOLE, ConsoleClient, page_text, script_elements
from tests.support.database import insert_events
from tests.support.environment import SECRET, new_signing_secret

TOKEN = "Zq3vR8xK1mWb7tYc0pLf5nHd2sGj9uAe-console-tests"  # strong: production checks it
OTHER_TOKEN = "Pw4nT7yU2iOa9sDf6gHj1kLz3xCv8bNm-oncall-tests"
KEYS = (f"ops:{TOKEN}", f"oncall:{OTHER_TOKEN}")
PAGES = ["/", "/endpoints", "/endpoints/notification", "/endpoints/notification/pause", "/audit"]
ACTIONS = ["pause", "resume", "disable", "enable", "rotate-secret", "remove"]
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture
async def api(api_factory: ApiFactory) -> RunningApi:
    return await api_factory(admin_api_keys=KEYS)


def console(api: RunningApi) -> ConsoleClient:
    return ConsoleClient(api.new_client(follow_redirects=False))


@pytest.fixture
async def signed_in(api: RunningApi) -> ConsoleClient:
    client = console(api)
    assert (await client.sign_in(TOKEN)).status_code == 303
    return client


async def test_without_admin_keys_the_console_is_absent(api_factory: ApiFactory) -> None:
    plain = await api_factory()
    for path in [*PAGES, "/sign-in", "/static/console.css"]:
        assert (await plain.client.get(CONSOLE + path)).status_code == 404, path
    for path in ["/sign-in", "/sign-out", "/endpoints/notification/pause"]:
        assert (await plain.client.post(CONSOLE + path, data={"token": TOKEN})).status_code == 404


async def test_without_a_session_pages_go_to_sign_in_and_actions_are_refused(
    api: RunningApi, db: asyncpg.Connection
) -> None:
    client = console(api)
    for path in PAGES:
        response = await client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"] == CONSOLE + "/sign-in"
    actions = [f"/endpoints/notification/{action}" for action in ACTIONS]
    for path in [*actions, "/replay/dead", "/replay/range"]:
        response = await client.post(path, csrf="anything")
        assert response.status_code == 403, path
        assert "Not signed in" in page_text(response.text)
    # A cookie the server did not sign is no session either.
    client.client.cookies.set("payment_console", "eyJrIjoib3BzIn0.forged", path=CONSOLE)
    assert (await client.get("/")).status_code == 303
    assert (await client.post("/endpoints/notification/pause", csrf="x")).status_code == 403
    assert (await endpoints.select_endpoint(db, "notification")).state == "ACTIVE"
    assert await audit_rows(db) == []


async def test_signing_in_with_an_admin_key_gives_a_short_lived_strict_cookie(
    api_factory: ApiFactory,
) -> None:
    api = await api_factory(admin_api_keys=KEYS, api_keys=("app:an-api-key-is-no-admin-key",))
    client = console(api)
    for wrong in ("", "nope", TOKEN + "x", "an-api-key-is-no-admin-key"):
        refused = await client.sign_in(wrong)
        assert refused.status_code == 401 and "set-cookie" not in refused.headers, wrong
        assert "not an admin key" in page_text(refused.text)
    signed = await client.sign_in(TOKEN)
    assert signed.status_code == 303 and signed.headers["location"] == CONSOLE + "/"
    cookie = signed.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "max-age", "path"} <= attributes and "secure" not in attributes
    assert "SameSite=Strict" in cookie and f"Path={CONSOLE};" in cookie + ";"
    assert "Max-Age=1800" in cookie
    assert TOKEN not in cookie
    overview = await client.get("/")
    assert overview.status_code == 200
    assert "signed in with ops" in page_text(overview.text)
    # Each page signs the cookie again (the idle time starts afresh).
    assert "payment_console=" in overview.headers["set-cookie"]


async def test_over_https_or_in_production_the_cookie_is_secure(api_factory: ApiFactory) -> None:
    api = await api_factory(
        environment="production",
        api_keys=("app:a-token-for-tests-only",),
        callback_signing_secret=SECRET,
        admin_api_keys=KEYS,
        gateway="none",
        notification_service_url="http://10.0.0.5:8085",  # production refuses loopback
    )
    signed = await console(api).sign_in(TOKEN)
    assert signed.status_code == 303
    assert (
        "Secure" in signed.headers["set-cookie"].split(";")[-1]
        or "; Secure" in (signed.headers["set-cookie"])
    )


async def test_every_action_needs_the_sessions_csrf_token(
    api: RunningApi, signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    other = console(api)
    await other.sign_in(OTHER_TOKEN)
    others_token = await other.csrf()
    paths = [f"/endpoints/notification/{action}" for action in ACTIONS]
    for path in [*paths, "/replay/dead", "/replay/range"]:
        for form in ({}, {"csrf": ""}, {"csrf": "not-the-token"}, {"csrf": others_token}):
            response = await signed_in.post(path, **form)
            assert response.status_code == 403, (path, form)
            assert "stale or not the console's" in page_text(response.text)
    assert (await signed_in.post("/sign-out")).status_code == 403
    assert (await endpoints.select_endpoint(db, "notification")).state == "ACTIVE"
    assert await audit_rows(db) == []
    done = await signed_in.act("/endpoints/notification/pause", reason="deploying")
    assert done.status_code == 303
    assert done.headers["location"] == CONSOLE + "/endpoints/notification?done=pause"
    assert (await endpoints.select_endpoint(db, "notification")).state == "PAUSED"


async def test_every_endpoint_action_is_confirmed_audited_and_a_new_secret_shown_once(
    signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    secret = new_signing_secret()
    async with db.transaction():
        await endpoints.insert_endpoint(
            db, name="trip", url="http://127.0.0.1:9/t", secret=secret, operator=OPERATOR
        )
    page = await signed_in.get("/endpoints/trip")
    for action in ("pause", "disable", "rotate-secret", "remove"):
        assert f'id="action-{action}"' in page.text, action
    assert 'id="action-resume"' not in page.text and 'id="action-enable"' not in page.text

    confirm = await signed_in.get("/endpoints/trip/remove")
    assert "0 undelivered deliveries" in page_text(confirm.text)
    for action, form in (
        ("pause", {"reason": "deploying"}),
        ("resume", {}),
        ("disable", {}),
        ("enable", {}),
    ):
        done = await signed_in.act(f"/endpoints/trip/{action}", **form)
        assert done.status_code == 303, (action, done.text[:300])
        shown = await signed_in.get("/endpoints/trip", done=action)
        assert "Done:" in page_text(shown.text)

    rotated = await signed_in.act("/endpoints/trip/rotate-secret")
    assert rotated.status_code == 200 and rotated.headers["cache-control"] == "no-store"
    new = (await endpoints.select_endpoint(db, "trip")).secret
    assert new is not None and new != secret
    assert new in rotated.text and secret not in rotated.text  # shown once, there
    for path in ("/", "/endpoints", "/endpoints/trip", "/audit", "/endpoints/trip/rotate-secret"):
        assert "whsec_" not in (await signed_in.get(path)).text, path
    # Its page names the secrets that sign by fingerprint, as each attempt's log does.
    signing = page_text((await signed_in.get("/endpoints/trip")).text)
    assert f"signed with the secret {fingerprint(secret_key(new))}" in signing
    assert f"the replaced secret {fingerprint(secret_key(secret))} signs too until" in signing

    removed = await signed_in.act("/endpoints/trip/remove")
    assert removed.headers["location"] == CONSOLE + "/endpoints?removed=trip"
    assert "Removed endpoint trip" in page_text(
        (await signed_in.get("/endpoints", removed="trip")).text
    )

    rows = await audit_rows(db)
    assert [row["action"] for row in rows[1:]] == [
        "endpoint.pause",
        "endpoint.resume",
        "endpoint.disable",
        "endpoint.enable",
        "endpoint.rotate_secret",
        "endpoint.remove",
    ]
    for row in rows[1:]:
        assert (row["actor"], row["origin"], row["target_id"]) == (
            "console:ops",
            "127.0.0.1",
            "trip",
        )
    assert rows[1]["reason"] == "deploying"
    assert json.loads(rows[3]["after"])["state_reason"] == "by console:ops"
    text = await audit_text(db)
    assert secret.removeprefix("whsec_") not in text and new.removeprefix("whsec_") not in text
    # Each appears on the audit page, the removed endpoint's name still its target.
    audit_page = (await signed_in.get("/audit", target="endpoint:trip")).text
    assert audit_page.count('<td class="action">') == len(rows)


async def test_a_refused_action_says_why_and_changes_nothing(
    signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    await signed_in.act("/endpoints/notification/disable")
    refused = await signed_in.act("/endpoints/notification/resume")
    assert refused.status_code == 409
    assert "is DISABLED" in page_text(refused.text)
    missing = await signed_in.act("/endpoints/notification/pause")  # allowed: DISABLED → PAUSED
    assert missing.status_code == 303
    assert (await signed_in.get("/endpoints/nobody")).status_code == 404
    assert (await signed_in.get("/endpoints/notification/explode")).status_code == 404
    csrf = await signed_in.csrf()
    assert (await signed_in.post("/endpoints/nobody/pause", csrf=csrf)).status_code == 404
    assert (await signed_in.post("/endpoints/notification/explode", csrf=csrf)).status_code == 404
    actions = [row["action"] for row in await audit_rows(db)]
    assert actions == ["endpoint.disable", "endpoint.pause"]


async def test_what_comes_from_outside_renders_as_text(
    signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    await signed_in.act("/endpoints/notification/pause", reason=HOSTILE)
    for path, params in (
        ("/", {}),
        ("/endpoints/notification", {}),
        ("/audit", {}),
        ("/audit", {"actor": HOSTILE}),
    ):
        page = await signed_in.get(path, **params)
        assert script_elements(page.text) == 0, path
        assert "<img" not in page.text, path
        if path != "/audit" or not params:
            assert HOSTILE in page_text(page.text), path
    assert (await endpoints.select_endpoint(db, "notification")).state_reason == HOSTILE


async def test_security_headers(signed_in: ConsoleClient) -> None:
    for path in [*PAGES, "/sign-in", "/static/console.css"]:
        response = await signed_in.get(path)
        assert response.status_code == 200, path
        headers = response.headers
        policy = headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
        assert "unsafe-inline" not in policy
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-content-type-options"] == "nosniff"
        if path.endswith(".css"):
            assert headers["content-type"].startswith("text/css")
            assert headers.get("cache-control") != "no-store"
        else:
            assert headers["cache-control"] == "no-store", path
            assert headers["content-type"] == "text/html; charset=utf-8"


async def test_sign_out_ends_the_session_in_the_browser(signed_in: ConsoleClient) -> None:
    out = await signed_in.post("/sign-out", csrf=await signed_in.csrf())
    assert out.status_code == 303 and out.headers["location"] == CONSOLE + "/sign-in"
    assert "Max-Age=0" in out.headers["set-cookie"]
    assert (await signed_in.get("/")).status_code == 303


async def test_the_console_lives_under_the_api_prefix(api_factory: ApiFactory) -> None:
    api = await api_factory(admin_api_keys=KEYS, api_prefix="/v1")
    client = ConsoleClient(api.new_client(follow_redirects=False), prefix="/v1")
    signed = await client.sign_in(TOKEN)
    assert signed.headers["location"] == "/v1" + CONSOLE + "/"
    assert "Path=/v1/admin/console" in signed.headers["set-cookie"]
    assert (await client.get("/endpoints")).status_code == 200
    assert (await api.client.get(CONSOLE + "/")).status_code == 404


async def test_the_audit_page_filters_and_pages(
    signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    await db.execute(
        """
        INSERT INTO audit_log (at, actor, action, target_kind, target_id, origin)
        SELECT now() - make_interval(secs => 100 - g), 'cli:alice', 'endpoint.pause', 'endpoint',
               'e' || g, 'tests'
          FROM generate_series(1, 60) AS g
        """
    )
    first = await signed_in.get("/audit")
    text = page_text(first.text)
    assert "e60" in text and "e36" in text and "e35 " not in text + " "
    assert 'id="older"' in first.text
    older = first.text.split('id="older"')[0].rsplit('href="', 1)[1].split('"')[0]
    second = await signed_in.client.get(older.replace("&amp;", "&"))
    assert "e35" in page_text(second.text) and "e60" not in page_text(second.text)
    only = page_text((await signed_in.get("/audit", target="e7")).text)
    assert "endpoint:e7" in only and "endpoint:e8" not in only
    for bad in ({"since": "yesterday"}, {"until": "2025-01-01T00:00:00"}, {"actor": "a\u0000b"}):
        refused = await signed_in.get("/audit", **bad)
        assert refused.status_code == 400, bad
        assert page_text(refused.text), bad


async def test_openapi_leaves_the_console_out(api: RunningApi) -> None:
    document: dict[str, Any] = (await api.client.get("/openapi.json")).json()
    assert not [path for path in document["paths"] if "console" in path]


async def test_a_payments_story_found_by_reference_trip_or_id(
    api: RunningApi, signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    created = await post_json(api.client, "/payments", payment_body(metadata={"note": HOSTILE}))
    assert created.status_code == 200, created.text
    payment = created.json()
    refund = await post_json(
        api.client,
        f"/payments/{payment['payment_id']}/refunds",
        {"idempotency_key": "story-refund", "amount": "50.00"},
    )
    assert refund.status_code == 200, refund.text
    # The relay's record of a failed attempt, as it writes it: the receiver's answer is any text.
    await db.execute(
        """
        UPDATE deliveries
           SET attempts = 1, last_error = $1,
               attempt_log = jsonb_build_array(jsonb_build_object(
                   'attempt', 1, 'at', now(), 'outcome', 'PENDING', 'status_code', 500,
                   'error', $1::text, 'tries', 1, 'duration_ms', 12,
                   'signed_with', 'abcdef012345'))
        """,
        "HTTP 500: " + HOSTILE,
    )
    story = CONSOLE + f"/payments/{payment['payment_id']}"
    for q in (payment["reference"], str(payment["trip_id"]), str(payment["payment_id"])):
        found = await signed_in.get("/payments", q=q)
        assert found.status_code == 303 and found.headers["location"] == story, q
    for q, status in (("PAY-20250101-00000000", 404), ("no such thing", 404), ("", 200)):
        assert (await signed_in.get("/payments", q=q)).status_code == status, q

    page = await signed_in.get(f"/payments/{payment['payment_id']}")
    assert page.status_code == 200
    text = page_text(page.text)
    assert payment["reference"] in text and "PARTIALLY_REFUNDED" in text
    assert "50.00" in text, "the refund"
    assert text.count("payment.succeeded") == 1 and text.count("payment.refunded") == 1
    assert f'"note": {json.dumps(HOSTILE)}' in text, "the metadata, as text"
    assert f"500 HTTP 500: {HOSTILE}" in text, "the receiver's answer, as text"
    assert "abcdef012345" in text and "12 ms" in text
    assert script_elements(page.text) == 0 and "<img" not in page.text
    assert (await signed_in.get("/payments/999999")).status_code == 404


async def test_replays_show_what_they_would_send_then_run_audited(
    signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    async with db.transaction():
        await endpoints.insert_endpoint(
            db, name="trip", url="http://127.0.0.1:9/t", operator=OPERATOR
        )
    events = await insert_events(db, payments=5)
    await db.execute(
        "UPDATE deliveries SET status = 'DEAD', attempts = 12 WHERE event_id = ANY ($1::bigint[])",
        [e.id for e in events[:3]],
    )
    # Dead: the preview counts per endpoint, then the confirmation runs it.
    preview = page_text((await signed_in.get("/replay/dead")).text)
    assert "6 dead deliveries would go back in line" in preview
    assert "notification 3" in preview and "trip 3" in preview
    only_trip = page_text((await signed_in.get("/replay/dead", name="trip")).text)
    assert "3 dead deliveries would go back in line" in only_trip
    assert "notification" not in only_trip.split("would go back in line")[1]
    done = await signed_in.act("/replay/dead?name=trip", name="trip", reason="receiver fixed")
    assert done.status_code == 303
    assert done.headers["location"] == CONSOLE + "/replay?replayed=3&to=trip"
    assert "Put 3 deliveries back in line to trip" in page_text(
        (await signed_in.get("/replay", replayed="3", to="trip")).text
    )
    counts = await db.fetch(
        "SELECT n.name, d.status, count(*) FROM deliveries d JOIN endpoints n USING (endpoint_id)"
        " GROUP BY 1, 2 ORDER BY 1, 2"
    )
    assert [tuple(row) for row in counts] == [
        ("notification", "DEAD", 3),
        ("notification", "PENDING", 2),
        ("trip", "PENDING", 5),
    ]
    assert "No dead deliveries to trip" in page_text(
        (await signed_in.get("/replay/dead", name="trip")).text
    )

    # A range: the preview says how many it never had and how many again.
    await db.execute(
        "DELETE FROM deliveries WHERE event_id = ANY ($1::bigint[])"
        " AND endpoint_id = (SELECT endpoint_id FROM endpoints WHERE name = 'trip')",
        [e.id for e in events[3:]],
    )
    since = "2000-01-01T00:00:00+00:00"
    ranged = page_text((await signed_in.get("/replay/range", name="trip", since=since)).text)
    assert "5 events of its types would go to trip: 2 it never had, 3 sent or tried before" in (
        ranged
    )
    query = urlencode({"name": "trip", "since": since})
    done = await signed_in.act(f"/replay/range?{query}", name="trip", since=since)
    assert done.headers["location"] == CONSOLE + "/replay?replayed=5&to=trip"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM deliveries WHERE status = 'PENDING'"
            " AND endpoint_id = (SELECT endpoint_id FROM endpoints WHERE name = 'trip')"
        )
        == 5
    )
    for bad in ({"name": "trip"}, {"name": "trip", "since": "yesterday"},
                {"name": "trip", "since": since, "until": since}):  # fmt: skip
        assert (await signed_in.get("/replay/range", **bad)).status_code == 400, bad
    assert (await signed_in.get("/replay/range", name="nobody", since=since)).status_code == 404
    assert (await signed_in.get("/replay/dead", name="nobody")).status_code == 404

    rows = await audit_rows(db, action="deliveries.replay")
    assert [(r["actor"], r["target_kind"], r["target_id"]) for r in rows] == [
        ("console:ops", "endpoint", "trip"),
        ("console:ops", "endpoint", "trip"),
    ]
    assert json.loads(rows[0]["after"]) == {"dead": True, "replayed": 3, "to": {"trip": 3}}
    assert rows[0]["reason"] == "receiver fixed"
    after = json.loads(rows[1]["after"])
    assert (after["added"], after["again"], after["since"]) == (2, 3, since)


async def test_enabling_a_disabled_endpoint_offers_what_it_missed(
    signed_in: ConsoleClient, db: asyncpg.Connection
) -> None:
    await signed_in.act("/endpoints/notification/disable")
    await insert_events(db, payments=2)  # written while DISABLED: no delivery to it
    enabled = await signed_in.act("/endpoints/notification/enable")
    assert enabled.status_code == 303
    location = enabled.headers["location"]
    assert location.startswith(CONSOLE + "/replay/range?name=notification&since=")
    offer = page_text((await signed_in.client.get(location)).text)
    assert "It was DISABLED from" in offer
    assert "2 events of its types would go to notification: 2 it never had" in offer
