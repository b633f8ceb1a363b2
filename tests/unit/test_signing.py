"""Standard Webhooks signatures: ours verify with the `standardwebhooks` package and back."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from payment_service.signing import secret_key, sign, verify

SECRET = "whsec_" + base64.b64encode(b"unit-test-signing-key-0123456789").decode()
BODY = b'{"event_id": "e1", "amount": 12.50, "status": "SUCCESS"}'
MSG_ID = "4f1c2a9e-7e59-4c51-9d38-3c3a4b6a5a10"


def headers(timestamp: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def test_secret_key_is_the_base64_part() -> None:
    assert secret_key(SECRET) == b"unit-test-signing-key-0123456789"


def test_standardwebhooks_verifies_our_signature() -> None:
    now = int(time.time())
    signature = sign(secret_key(SECRET), MSG_ID, now, BODY)
    assert signature.startswith("v1,")
    assert Webhook(SECRET).verify(BODY, headers(now, signature)) == {
        "event_id": "e1",
        "amount": 12.5,
        "status": "SUCCESS",
    }


def test_a_known_vector() -> None:
    # From the Standard Webhooks specification's example.
    key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


@pytest.mark.parametrize(
    "tamper",
    ["body", "id", "timestamp", "key"],
)
def test_tampering_breaks_the_signature(tamper: str) -> None:
    now = int(time.time())
    key = secret_key(SECRET)
    signature = sign(key, MSG_ID, now, BODY)
    body, msg_id, ts, check_key = BODY, MSG_ID, now, key
    if tamper == "body":
        body = BODY.replace(b"12.50", b"99.50")
    elif tamper == "id":
        msg_id = MSG_ID[:-1] + "1"
    elif tamper == "timestamp":
        ts = now + 1
    else:
        check_key = b"another-key-entirely-000000000000"
    assert not verify(
        check_key, msg_id=msg_id, timestamp=str(ts), body=body, signature_header=signature, now=now
    )
    with pytest.raises(WebhookVerificationError):
        Webhook(base64.b64encode(check_key).decode()).verify(
            body,
            {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature},
        )


def test_verify_accepts_any_of_several_signatures_and_fresh_timestamps_only() -> None:
    key = secret_key(SECRET)
    now = int(time.time())
    good = sign(key, MSG_ID, now, BODY)
    header = f"v1,AAAA v2,zzz {good}"
    assert verify(
        key, msg_id=MSG_ID, timestamp=str(now), body=BODY, signature_header=header, now=now
    )
    assert not verify(
        key, msg_id=MSG_ID, timestamp=str(now), body=BODY, signature_header="", now=now
    )
    assert not verify(
        key, msg_id=MSG_ID, timestamp="yesterday", body=BODY, signature_header=good, now=now
    )
    stale = now - 301
    assert not verify(
        key,
        msg_id=MSG_ID,
        timestamp=str(stale),
        body=BODY,
        signature_header=sign(key, MSG_ID, stale, BODY),
        now=now,
    )
