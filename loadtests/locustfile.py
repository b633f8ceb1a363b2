"""Locust load test: a ride-hailing day against the Payment Service.

Users, weighted like a day of trips (see `weight`):
- TripCompletion (10): the Trip Service charges a finished trip with a fresh key per trip
  (`trip-<trip_id>-charge`, as the seed guide advises); one trip in ten retries with the same key,
  as a client does after a timeout, and the retry must replay the very same answer.
- RiderApp (6): riders' and drivers' apps poll a payment's status, and list a trip's payments.
- SupportDesk (1): support agents refund part or all of a recent payment.
- SameKeyStorm (1): bursts of clients sending one key at once; every answer must be the same 200
  (one payment) or a 409 IDEMPOTENCY_KEY_IN_PROGRESS.
Run one scenario alone by naming its class: `locust -f loadtests/locustfile.py SameKeyStorm`.

Any status code a request does not expect counts as a failure, and so does a body that breaks the
contract (a replay that differs, a second payment for one key). Settings: loadtests/locust.conf;
`LOADTEST_API_KEY` (sent as a bearer token) and `LOADTEST_API_PREFIX` (e.g. /v1) if the service
uses them.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import secrets
import time
import uuid
from decimal import Decimal
from typing import Any

from locust import FastHttpUser, between, task

from payment_service.vocabulary import PAYMENT_METHODS, PAYMENT_STATUSES

PREFIX = os.environ.get("LOADTEST_API_PREFIX", "").rstrip("/")
API_KEY = os.environ.get("LOADTEST_API_KEY", "")
# Shared by every process of one run (set it for `--processes`), so storms collide across them.
RUN_ID = os.environ.get("LOADTEST_RUN_ID") or uuid.uuid4().hex[:12]
SYNC_METHODS = PAYMENT_METHODS  # every method: the service under load has no ASYNC_METHODS
RETRY_SHARE = 0.1
STORM_WINDOW_SECONDS = 2
STORM_ATTEMPTS = 3
STORM_BACKOFF_SECONDS = 0.05
# Every charge the load test makes should succeed: a FAILED payment counts as a failure.
GOOD_STATUSES = frozenset(PAYMENT_STATUSES) - {"FAILED"}

# Payments created in this process, for the apps to poll and support to refund.
recent_payments: collections.deque[dict[str, Any]] = collections.deque(maxlen=5000)
# Storm key -> the body of its first 200 answer: every later 200 must be byte-identical.
storm_answers: dict[str, str] = {}


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if API_KEY:
        headers["Authorization"] = f"Bearer {API_KEY}"
    return headers


def new_trip_id() -> int:
    """A trip id no earlier run used: random 62 bits (int64, positive)."""
    return secrets.randbits(62) or 1


def random_amount() -> str:
    return f"{random.randint(40, 2500)}.{random.randint(0, 99):02d}"


def _problem_code(response: Any) -> str | None:
    try:
        return response.json().get("code")
    except (ValueError, AttributeError):
        return None


class PaymentUser(FastHttpUser):
    abstract = True

    def post(self, path: str, body: dict[str, Any], name: str) -> Any:
        return self.client.post(
            PREFIX + path, data=json.dumps(body), headers=_headers(), name=name, catch_response=True
        )

    def get(self, path: str, name: str) -> Any:
        return self.client.get(PREFIX + path, headers=_headers(), name=name, catch_response=True)


class TripCompletion(PaymentUser):
    weight = 10
    wait_time = between(0.5, 2.0)

    @task
    def complete_trip(self) -> None:
        trip_id = new_trip_id()
        amount = random_amount()
        body = {
            "idempotency_key": f"trip-{trip_id}-charge",
            "trip_id": trip_id,
            "method": random.choice(SYNC_METHODS),
            "amount": amount,
            "metadata": {"city": random.choice(["BLR", "DEL", "BOM", "HYD"]), "run": RUN_ID},
        }
        with self.post("/payments", body, "POST /payments") as response:
            if response.status_code not in (200, 202):
                response.failure(f"unexpected status {response.status_code}: {response.text}")
                return
            document = response.json()
            problem = check_payment(document, trip_id=trip_id, amount=amount)
            if problem:
                response.failure(problem)
                return
            first_status, first_body = response.status_code, response.text
        recent_payments.append(
            {"payment_id": document["payment_id"], "trip_id": trip_id, "amount": Decimal(amount)}
        )
        if random.random() < RETRY_SHARE:
            self.retry_same_key(body, first_status, first_body)

    def retry_same_key(self, body: dict[str, Any], status: int, text: str) -> None:
        with self.post("/payments", body, "POST /payments (client retry, same key)") as response:
            if response.status_code != status:
                response.failure(f"replay answered {response.status_code}, first answer {status}")
            elif response.text != text:
                response.failure("replay body differs from the first answer")
            elif response.headers.get("Idempotent-Replayed") != "true":
                response.failure("replay lacks 'Idempotent-Replayed: true'")


def check_payment(document: dict[str, Any], *, trip_id: int, amount: str) -> str | None:
    """What is wrong with a payment answer, or None."""
    if not isinstance(document.get("payment_id"), int):
        return f"no payment_id in {document}"
    if document.get("trip_id") != trip_id:
        return f"trip_id {document.get('trip_id')} != {trip_id}"
    if Decimal(str(document.get("amount"))) != Decimal(amount):
        return f"amount {document.get('amount')} != {amount}"
    if document.get("status") not in GOOD_STATUSES:
        return f"unexpected payment status {document.get('status')}"
    return None


class RiderApp(PaymentUser):
    weight = 6
    wait_time = between(1.0, 3.0)

    def _pick(self) -> dict[str, Any] | None:
        return random.choice(recent_payments) if recent_payments else None

    @task(4)
    def poll_status(self) -> None:
        payment = self._pick()
        if payment is None:
            return
        with self.get(f"/payments/{payment['payment_id']}", "GET /payments/{id}") as response:
            if response.status_code != 200:
                response.failure(f"unexpected status {response.status_code}: {response.text}")
            elif response.json().get("payment_id") != payment["payment_id"]:
                response.failure("answered another payment")

    @task(1)
    def list_trip_payments(self) -> None:
        payment = self._pick()
        if payment is None:
            return
        with self.get(
            f"/payments?trip_id={payment['trip_id']}&limit=5", "GET /payments?trip_id="
        ) as response:
            if response.status_code != 200:
                response.failure(f"unexpected status {response.status_code}: {response.text}")
            elif payment["payment_id"] not in [
                p.get("payment_id") for p in response.json().get("data", [])
            ]:
                response.failure("the trip's payment is missing from the list")


class SupportDesk(PaymentUser):
    weight = 1
    wait_time = between(2.0, 5.0)

    @task
    def refund(self) -> None:
        if not recent_payments:
            return
        payment = random.choice(recent_payments)
        body: dict[str, Any] = {
            "idempotency_key": f"refund-{uuid.uuid4()}",
            "metadata": {"reason": "load test", "run": RUN_ID},
        }
        if random.random() < 0.7:  # most refunds are partial
            body["amount"] = str((payment["amount"] / 4).quantize(Decimal("0.01")) or "0.01")
        path = f"/payments/{payment['payment_id']}/refunds"
        with self.post(path, body, "POST /payments/{id}/refunds") as response:
            if response.status_code == 200:
                document = response.json()
                if (
                    document.get("status") != "REFUNDED"
                    or document.get("payment_id") != payment["payment_id"]
                ):
                    response.failure(f"unexpected refund answer {document}")
                elif document.get("payment_status") == "REFUNDED":
                    _forget(payment)
            elif response.status_code == 400 and _problem_code(response) in (
                "REFUND_EXCEEDS_REMAINING",
                "PAYMENT_NOT_REFUNDABLE",
            ):
                # Another agent refunded it first: an expected business answer.
                response.success()
                _forget(payment)
            else:
                response.failure(f"unexpected status {response.status_code}: {response.text}")


def _forget(payment: dict[str, Any]) -> None:
    with contextlib.suppress(ValueError):
        recent_payments.remove(payment)


class SameKeyStorm(PaymentUser):
    """At the start of every window all storm users send the window's key at once.

    A client answered 409 retries the same key after a short backoff, as the seed guide says;
    the retry must get the replay of the one payment.
    """

    weight = 1

    def wait_time(self) -> float:
        return STORM_WINDOW_SECONDS - time.time() % STORM_WINDOW_SECONDS + random.uniform(0, 0.005)

    @task
    def storm(self) -> None:
        window = int(time.time() // STORM_WINDOW_SECONDS)
        key = f"storm-{RUN_ID}-{window}"
        trip_id = int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big") + 1
        body = {"idempotency_key": key, "trip_id": trip_id, "method": "CARD", "amount": "99.00"}
        for _ in range(STORM_ATTEMPTS):
            with self.post("/payments", body, "POST /payments (same-key storm)") as response:
                if response.status_code == 200:
                    first = storm_answers.setdefault(key, response.text)
                    if response.text != first:
                        response.failure("two different 200 answers for one key")
                    return
                if (
                    response.status_code == 409
                    and _problem_code(response) == "IDEMPOTENCY_KEY_IN_PROGRESS"
                ):
                    response.success()
                else:
                    response.failure(f"unexpected status {response.status_code}: {response.text}")
                    return
            time.sleep(STORM_BACKOFF_SECONDS)  # the client's backoff (gevent-patched)
