"""One delivery attempt against a real HTTP receiver on 127.0.0.1: headers, signature, retries."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from outbox_relay import outbox
from outbox_relay.delivery import Deliverer
from outbox_relay.http import CallbackClient
from outbox_relay.outbox import AttemptRecord, ClaimedEvent
from payment_service.callback_urls import NetworkPolicy
from payment_service.embedded import free_port
from payment_service.signing import secret_key
from tests.support.environment import CALLBACK_PATH, SECRET, new_signing_secret
from tests.support.receiver import OK, Delivery, Receiver, Reply, answer_status

BODY = b'{"event_id": "%s", "amount": 150.50, "status": "SUCCESS", "reference": "PAY-1"}'

LOCAL = NetworkPolicy(allow_loopback=True)  # the tests' receivers are on 127.0.0.1


def event(attempts: int = 0) -> ClaimedEvent:
    event_id = str(uuid.uuid4())
    return ClaimedEvent(
        id=1,
        endpoint_id=1,
        event_id=event_id,
        aggregate_id=7,
        body=BODY % event_id.encode(),
        attempts=attempts,
        created_at=time.time(),
        claim_token=uuid.uuid4(),
    )


DelivererFactory = Callable[..., Deliverer]


@pytest.fixture
def deliverer(receiver: Receiver) -> DelivererFactory:
    def make(*, url: str = receiver.base_url + CALLBACK_PATH, **overrides: object) -> Deliverer:
        timeout = float(overrides.get("request_timeout", 0.5))  # type: ignore[arg-type]
        client = CallbackClient(
            url, networks=LOCAL, max_connections=4, timeout=timeout, user_agent="test"
        )
        options: dict[str, object] = {
            "signing_keys": [secret_key(SECRET)],
            "request_timeout": timeout,
            "quick_retries": 2,
            "quick_retry_wait": 0.01,
            "max_attempts": 5,
            "schedule": (30.0, 60.0),
            "stopping": lambda: False,
        }
        options.update(overrides)
        return Deliverer(client, **options)  # type: ignore[arg-type]

    return make


def far_deadline() -> float:
    return time.monotonic() + 60


async def test_a_delivery_carries_the_standard_webhooks_headers_and_the_exact_body(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    e = event()
    result = await deliverer().deliver(e, lease_deadline=far_deadline())
    assert (result.status, result.status_code, result.error, result.tries) == (
        "DELIVERED",
        200,
        None,
        1,
    )
    (got,) = receiver.deliveries
    assert got.body == e.body
    assert got.headers["content-type"] == "application/json"
    assert got.headers["idempotency-key"] == e.event_id
    assert got.headers["webhook-id"] == e.event_id
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 5
    assert got.headers["webhook-signature"].startswith("v1,")
    assert got.verify() == json.loads(e.body)  # the standardwebhooks package agrees


async def test_without_a_secret_the_callback_is_unsigned(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    e = event()
    await deliverer(signing_keys=[]).deliver(e, lease_deadline=far_deadline())
    (got,) = receiver.deliveries
    assert "webhook-signature" not in got.headers
    assert got.headers["webhook-id"] == e.event_id


async def test_each_signing_key_adds_one_signature_each_verifiable_alone(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    """After a rotation an endpoint signs with two secrets (Standard Webhooks): one `v1,…` each."""
    other = new_signing_secret()
    e = event()
    await deliverer(signing_keys=[secret_key(other), secret_key(SECRET)]).deliver(
        e, lease_deadline=far_deadline()
    )
    (got,) = receiver.deliveries
    signatures = got.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    assert got.verify(SECRET) == json.loads(e.body)
    assert got.verify(other) == json.loads(e.body)
    with pytest.raises(WebhookVerificationError):
        got.verify(new_signing_secret())


async def test_quick_retries_recover_from_a_brief_failure(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    async def flaky(d: Delivery) -> Reply:
        return OK if d.seq >= 2 else Reply(503)

    receiver.policy = flaky
    result = await deliverer().deliver(event(), lease_deadline=far_deadline())
    assert (result.status, result.tries) == ("DELIVERED", 3)
    assert [d.status for d in receiver.deliveries] == [503, 503, 200]
    assert len({d.headers["webhook-id"] for d in receiver.deliveries}) == 1


async def test_after_the_quick_retries_the_event_is_rescheduled(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    receiver.policy = answer_status(500)
    result = await deliverer().deliver(event(), lease_deadline=far_deadline())
    assert (result.status, result.status_code, result.tries) == ("PENDING", 500, 3)
    assert result.error is not None and result.error.startswith("HTTP 500")
    assert 27 <= result.delay <= 33  # schedule[0] = 30 s, ±10 %
    assert len(receiver.deliveries) == 3


async def test_a_short_retry_after_is_waited_inline(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    async def busy_once(d: Delivery) -> Reply:
        return OK if d.seq else Reply(429, headers=(("retry-after", "1"),))

    receiver.policy = busy_once
    result = await deliverer(quick_retry_wait=0.2).deliver(event(), lease_deadline=far_deadline())
    assert (result.status, result.tries) == ("DELIVERED", 2)
    first, second = receiver.deliveries
    assert second.arrived - first.arrived >= 0.95


async def test_a_long_retry_after_ends_the_attempt_and_sets_the_delay(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    receiver.policy = answer_status(503, (("retry-after", "120"),))
    result = await deliverer().deliver(event(), lease_deadline=far_deadline())
    assert (result.status, result.tries, result.delay) == ("PENDING", 1, 120)


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422, 301])
async def test_other_answers_are_failed_attempts_without_quick_retries(
    receiver: Receiver, deliverer: DelivererFactory, status: int
) -> None:
    receiver.policy = answer_status(status)
    result = await deliverer().deliver(event(), lease_deadline=far_deadline())
    assert (result.status, result.status_code, result.tries) == ("PENDING", status, 1)
    assert result.error == f'HTTP {status}: {{"error": "test"}}'


async def test_410_gone_keeps_the_delivery_pending_and_uncounted(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    # the endpoint is DISABLED instead (endpoint health); the delivery waits for `enable`,
    # even on what would have been its last attempt
    receiver.policy = answer_status(410)
    result = await deliverer(max_attempts=5).deliver(
        event(attempts=4), lease_deadline=far_deadline()
    )
    assert (result.status, result.status_code, result.tries) == ("PENDING", 410, 1)
    assert not result.counted


async def test_an_uncounted_attempt_never_makes_a_delivery_dead(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    # a half-open breaker's probe: recorded, not counted toward RELAY_MAX_ATTEMPTS
    receiver.policy = answer_status(500)
    probe = event(attempts=4)
    probe.counted = False
    result = await deliverer(max_attempts=5).deliver(probe, lease_deadline=far_deadline())
    assert (result.status, result.counted) == ("PENDING", False)


async def test_the_last_attempt_failing_is_dead(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    receiver.policy = answer_status(500)
    result = await deliverer(max_attempts=5).deliver(
        event(attempts=4), lease_deadline=far_deadline()
    )
    assert result.status == "DEAD"
    result = await deliverer(max_attempts=5).deliver(
        event(attempts=3), lease_deadline=far_deadline()
    )
    assert result.status == "PENDING"


async def test_a_timeout_is_retried_then_rescheduled(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    async def hang(_d: Delivery) -> Reply:
        await asyncio.sleep(2)
        return OK

    receiver.policy = hang
    started = time.monotonic()
    result = await deliverer(request_timeout=0.2, quick_retries=1).deliver(
        event(), lease_deadline=far_deadline()
    )
    assert (result.status, result.status_code, result.tries) == ("PENDING", None, 2)
    assert result.error is not None and result.error.startswith("timeout")
    assert time.monotonic() - started < 1.5


async def test_a_dropped_connection_is_retryable(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    async def drop_first(d: Delivery) -> Reply | None:
        return OK if d.seq else None

    receiver.policy = drop_first
    result = await deliverer().deliver(event(), lease_deadline=far_deadline())
    assert (result.status, result.tries) == ("DELIVERED", 2)


async def test_a_refused_connection_is_retryable(deliverer: DelivererFactory) -> None:
    closed = f"http://127.0.0.1:{free_port()}{CALLBACK_PATH}"
    result = await deliverer(url=closed).deliver(event(), lease_deadline=far_deadline())
    assert (result.status, result.status_code, result.tries) == ("PENDING", None, 3)
    assert result.error is not None and result.error.startswith("connection error")


async def test_no_quick_retry_that_could_outlive_the_lease_or_a_shutdown(
    receiver: Receiver, deliverer: DelivererFactory
) -> None:
    receiver.policy = answer_status(500)
    result = await deliverer(request_timeout=5).deliver(
        event(), lease_deadline=time.monotonic() + 2
    )
    assert result.tries == 1
    stopping = await deliverer(stopping=lambda: True).deliver(
        event(), lease_deadline=far_deadline()
    )
    assert stopping.tries == 1 and stopping.status == "PENDING"


async def raw_answer_url(answer: bytes) -> tuple[str, asyncio.Server]:
    """A server on 127.0.0.1 that reads one request per connection, writes `answer`, hangs up."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(answer)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{CALLBACK_PATH}", server


async def deliver_to_raw(
    deliverer: DelivererFactory, answer: bytes, *, quick_retries: int
) -> AttemptRecord:
    """One attempt against a server that answers every request with `answer`."""
    url, server = await raw_answer_url(answer)
    try:
        return await deliverer(url=url, quick_retries=quick_retries).deliver(
            event(), lease_deadline=far_deadline()
        )
    finally:
        server.close()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 999 Odd\r\ncontent-length: 4\r\n\r\nhuh?", "HTTP/1.1 999 Odd: huh?"),
        (b"HTTP/1.1 099 x\r\ncontent-length: 0\r\n\r\n", "HTTP/1.1 099 x"),
        (b"HTTP/1.1 999 \x00\xff\r\ncontent-length: 0\r\n\r\n", "HTTP/1.1 999 \ufffd\xff"),
    ],
)
async def test_a_status_outside_100_to_599_is_a_retryable_failure_with_its_line_kept(
    deliverer: DelivererFactory, answer: bytes, error: str
) -> None:
    result = await deliver_to_raw(deliverer, answer, quick_retries=1)
    assert (result.status, result.status_code, result.tries) == ("PENDING", None, 2)
    assert result.error == error


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 500 Oops\r\ncontent-length: 9\r\n\r\nbad\x00\x00body",
        b"HTTP/1.1 400 Bad\r\ncontent-length: 6\r\n\r\n\xed\xa0\x80\x00\xff!",
        b"HTTP/1.1 500 Oops\r\ncontent-length: 600\r\n\r\n" + b"\x00" * 600,
    ],
)
async def test_an_error_body_is_kept_as_storable_bounded_text(
    deliverer: DelivererFactory, answer: bytes
) -> None:
    result = await deliver_to_raw(deliverer, answer, quick_retries=0)
    assert result.status == "PENDING" and result.error is not None
    assert "\x00" not in result.error  # PostgreSQL text and jsonb refuse it
    result.error.encode("utf-8")  # no lone surrogate
    assert len(result.error) <= outbox.ERROR_TEXT_LIMIT


async def test_a_malformed_answer_is_a_retryable_failure(deliverer: DelivererFactory) -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-5\r\nabc\r\n0\r\n\r\n"
    result = await deliver_to_raw(deliverer, chunked, quick_retries=0)
    assert (result.status, result.status_code, result.tries) == ("PENDING", None, 1)
    assert result.error == "connection error: invalid chunk size: b'-5'"
