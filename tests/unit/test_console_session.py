"""The console's session cookie: signed with a key derived from the admin keys, ended by idleness,
by age, and by any change of the admin keys; its CSRF token compared whole."""

from __future__ import annotations

import pytest

from app.console.session import IDLE_SECONDS, MAX_SECONDS, Sessions
from payment_service.config import ApiKey

KEYS = (ApiKey("ops", "first-admin-token-for-tests"), ApiKey("oncall", "second-admin-token"))
T0 = 1_800_000_000.0


def test_a_session_comes_back_from_its_cookie_and_names_no_token() -> None:
    sessions = Sessions(KEYS)
    session = sessions.new("ops", now=T0)
    cookie = sessions.dump(session, now=T0)
    assert "first-admin-token" not in cookie and "second-admin-token" not in cookie
    again = sessions.load(cookie, now=T0 + 1)
    assert again is not None and (again.key_name, again.csrf) == ("ops", session.csrf)
    # Another worker or replica with the same admin keys (in any order) reads it too.
    assert Sessions(tuple(reversed(KEYS))).load(cookie, now=T0 + 1) == again


def test_idle_and_old_sessions_end() -> None:
    sessions = Sessions(KEYS)
    session = sessions.new("ops", now=T0)
    cookie = sessions.dump(session, now=T0)
    assert sessions.load(cookie, now=T0 + IDLE_SECONDS) is not None
    assert sessions.load(cookie, now=T0 + IDLE_SECONDS + 1) is None, "idle"
    assert sessions.load(cookie, now=T0 - 60) is None, "from the future"
    # Each answer signs it again, so a used session goes on... up to MAX_SECONDS after sign-in.
    seen = T0
    while seen + IDLE_SECONDS / 2 <= T0 + MAX_SECONDS:
        seen += IDLE_SECONDS / 2
        loaded = sessions.load(cookie, now=seen)
        assert loaded is not None, seen - T0
        cookie = sessions.dump(loaded, now=seen)
    assert sessions.load(cookie, now=T0 + MAX_SECONDS + 1) is None, "too old"


@pytest.mark.parametrize(
    "keys",
    [
        (KEYS[0], ApiKey("oncall", "a-new-second-admin-token")),  # a token changed
        (KEYS[0],),  # a key removed
        (*KEYS, ApiKey("new", "a-third-admin-token-here")),  # a key added
    ],
)
def test_any_change_of_the_admin_keys_signs_everyone_out(keys: tuple[ApiKey, ...]) -> None:
    cookie = Sessions(KEYS).dump(Sessions(KEYS).new("ops", now=T0), now=T0)
    assert Sessions(keys).load(cookie, now=T0 + 1) is None


def test_tampered_foreign_and_garbage_cookies_are_no_session() -> None:
    sessions = Sessions(KEYS)
    cookie = sessions.dump(sessions.new("ops", now=T0), now=T0)
    payload, _, signature = cookie.rpartition(".")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for sent in ("", None, "garbage", cookie + "x", f"{payload}.{flipped}", "a.b.c"):
        assert sessions.load(sent, now=T0 + 1) is None, sent
    # A cookie naming a key that is not listed, signed with the right key, is refused too.
    stranger = sessions.dump(sessions.new("mallory", now=T0), now=T0)
    assert sessions.load(stranger, now=T0 + 1) is None


def test_the_csrf_token_is_random_and_compared_whole() -> None:
    sessions = Sessions(KEYS)
    one, two = sessions.new("ops", now=T0), sessions.new("ops", now=T0)
    assert one.csrf != two.csrf and len(one.csrf) >= 40
    assert one.csrf_matches(one.csrf)
    for sent in ("", two.csrf, one.csrf[:-1], one.csrf + "x", one.csrf.upper()):
        assert not one.csrf_matches(sent), sent
