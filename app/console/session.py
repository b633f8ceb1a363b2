"""The console's sessions: a short-lived cookie signed by the server, with a CSRF token bound to it.

Signing in with an admin key (ADMIN_API_KEYS) gives a cookie that names the key, never holds its
token, and carries a random CSRF token; every state-changing request must send that token back in
a form field (compared in constant time), so another site cannot make a signed-in browser act.

The cookie is signed (itsdangerous: HMAC-SHA256) with a key derived from every admin token, sorted
(an HMAC over them): every worker of `serve --workers N` and every replica signs alike with no
setting of its own, and changing any admin key in ADMIN_API_KEYS signs every session out. A
session ends IDLE_SECONDS after its last request (each answer signs the cookie again with the new
time) or MAX_SECONDS after signing in, whichever is first, and when its key is no longer listed.

Pure functions of their inputs (the time included), so the tests need no clock.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer

from payment_service.config import ApiKey

COOKIE = "payment_console"
IDLE_SECONDS = 30 * 60  # a session unused this long ends
MAX_SECONDS = 8 * 3600  # and any session this long after signing in
CSRF_FIELD = "csrf"
_KEY_DERIVATION = b"payment-service console session signing key v1"


@dataclass(frozen=True)
class ConsoleSession:
    key_name: str  # the admin key signed in with (ADMIN_API_KEYS' name)
    csrf: str  # the token every form sends back
    signed_in_at: float  # seconds since the epoch
    seen_at: float  # the last request's time, ditto

    def csrf_matches(self, sent: str) -> bool:
        return hmac.compare_digest(sent.encode(), self.csrf.encode())


class Sessions:
    """Sessions signed with the key derived from `keys` (the admin keys)."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        tokens = "\n".join(sorted(f"{key.name}:{key.token}" for key in keys))
        secret = hmac.new(_KEY_DERIVATION, tokens.encode(), hashlib.sha256).digest()
        self._serializer = URLSafeSerializer(
            secret, salt="console-session", signer_kwargs={"digest_method": hashlib.sha256}
        )
        self._names = frozenset(key.name for key in keys)

    def new(self, key_name: str, *, now: float) -> ConsoleSession:
        return ConsoleSession(key_name, secrets.token_urlsafe(32), now, now)

    def dump(self, session: ConsoleSession, *, now: float) -> str:
        """The cookie's value, seen now."""
        document: dict[str, Any] = {
            "k": session.key_name,
            "c": session.csrf,
            "s": session.signed_in_at,
            "t": now,
        }
        return self._serializer.dumps(document)

    def load(self, cookie: str | None, *, now: float) -> ConsoleSession | None:
        """The session of a cookie, or None: unsigned or signed by other keys, idle too long,
        too old, or of a key no longer listed."""
        if not cookie:
            return None
        try:
            document = self._serializer.loads(cookie)
            session = ConsoleSession(
                str(document["k"]), str(document["c"]), float(document["s"]), float(document["t"])
            )
        except (BadSignature, KeyError, TypeError, ValueError):
            return None
        if session.key_name not in self._names:
            return None
        if not (0 <= now - session.seen_at <= IDLE_SECONDS):
            return None
        if not (0 <= now - session.signed_in_at <= MAX_SECONDS):
            return None
        return session
