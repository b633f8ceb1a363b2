"""Standard Webhooks signatures (https://www.standardwebhooks.com): sign and verify.

The signature is `v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`, keyed
with the base64-decoded part of the `whsec_…` secret. Pure functions; the sink verifies with the
same code the relay signs with, and the tests verify with the `standardwebhooks` package.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
FINGERPRINT_HEX_DIGITS = 12  # of a key's SHA-256: enough to tell an endpoint's secrets apart
TIMESTAMP_TOLERANCE_SECONDS = 300  # what standardwebhooks receivers accept by default


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret (already validated by the settings)."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def fingerprint(key: bytes) -> str:
    """A short name for a signing key that is safe to store and show: the start of its SHA-256,
    in hex. It tells the secrets of an endpoint apart (which signed an attempt) and reveals
    nothing usable of the key."""
    return hashlib.sha256(key).hexdigest()[:FINGERPRINT_HEX_DIGITS]


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one request."""
    mac = hmac.new(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify(
    key: bytes,
    *,
    msg_id: str,
    timestamp: str,
    body: bytes,
    signature_header: str,
    now: float,
    tolerance: float = TIMESTAMP_TOLERANCE_SECONDS,
) -> bool:
    """True when one of the space-separated `v1,…` signatures matches and the timestamp is fresh."""
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    if abs(now - sent_at) > tolerance:
        return False
    expected = sign(key, msg_id, sent_at, body)
    return any(
        hmac.compare_digest(candidate, expected)
        for candidate in signature_header.split()
        if candidate.startswith("v1,")
    )
