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
TIMESTAMP_TOLERANCE_SECONDS = 300  # what standardwebhooks receivers accept by default


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret (already validated by the settings)."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


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
