"""The machinery of the gateway's fault tests: a stack that charges at an embedded gateway of its
own, clients that pay and refund under load, and the kills and holds that stop a process between
two phases.

`MoneyStack` is the service's processes of one test (tests/faults/harness.py's `ServiceStack`) with
a real `localstripe` process of the test's own and two fault proxies (tests/support/fault_proxy.py):
`gateway_proxy` in front of the gateway (the API's, and where a test says the relay's, way to it)
and `api_proxy` in front of the API (the clients' way to it). The gateway's webhook goes straight
to the API.

A test stops the API (or the relay) between two phases by holding, at a proxy, the call that
starts the next phase, killing the process with SIGKILL while the proxy holds it, then letting go:

| held | the process died |
|---|---|
| the create, not forwarded | after phase 1 (staged), before any call |
| the create, forwarded, its answer held | after the intent was created, before its id was kept |
| the confirm, not forwarded | after the intent's id was recorded, before the confirm |
| the confirm, forwarded, its answer held | after the gateway charged, before the result |
| the client's POST, forwarded, answer held | after the result was written, the client not told |

A killed API leaves the operations it leased `STARTED` until their lease runs out
(GATEWAY_TIMEOUT_SECONDS + 5 s). The API of a kill test runs with a long time-out, so that the
kill always lands while the held call is in flight (never a race with the time-out); instead of
waiting out that long lease, the test ends the dead process's leases itself (`end_dead_leases`),
which is what their running out would do: only a dead process's leases, only once it is dead.

Everything waits on conditions with deadlines. The only sleeps are a client's pause between
retries, as a real client pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx

from payment_service.gateway.embedded import EmbeddedGateway
from tests.faults.harness import ServiceStack, assert_every_event_delivered, finish_clients
from tests.support.fault_proxy import Action, Exchange, FaultProxy, Matcher, Request, matching
from tests.support.fault_report import record
from tests.support.gateway import WEBHOOK_SECRET, gateway_settings, make_payment_method
from tests.support.money_checks import Counts, assert_money_consistent
from tests.support.processes import ApiProcess, ServiceProcess
from tests.support.waiting import wait_for

WEBHOOK_PATH = "/gateway/stripe/webhook"
CREATE = matching("POST", "/v1/payment_intents")
CONFIRM = matching("POST", r"/v1/payment_intents/\w+/confirm")
REFUND = matching("POST", "/v1/refunds")
RETRIEVE = matching("GET", r"/v1/payment_intents/\w+")
_REFUNDS_LISTED = matching("GET", "/v1/refunds")


def FIND_REFUND(request: Request) -> bool:
    """The worker's search for a refund of one intent, not a reconciliation's listing of every
    refund (which a relay makes at its start, and which must not be the request held)."""
    return _REFUNDS_LISTED(request) and "payment_intent=" in request.target


PAY = matching("POST", "/payments")
PAY_REFUND = matching("POST", r"/payments/\d+/refunds")

CLIENT_TIMEOUT_SECONDS = 30.0
OPERATION_DEADLINE_SECONDS = 120.0
# A process that must not time out a held call before the test kills it waits this long.
LONG_TIMEOUT_SECONDS = 60
# The worker's calls when it goes straight to the gateway.
WORKER_TIMEOUT_SECONDS = 5
FINAL = ("SUCCESS", "FAILED", "PARTIALLY_REFUNDED", "REFUNDED")


# -- the stack ------------------------------------------------------------------------------------
@dataclass
class MoneyStack:
    services: ServiceStack
    gateway: EmbeddedGateway
    gateway_proxy: FaultProxy
    api_proxy: FaultProxy | None = None
    api: ApiProcess | None = None
    relay: ServiceProcess | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def db(self) -> Any:
        return self.services.db

    def gateway_env(self, *, through_proxy: bool, timeout: float) -> dict[str, Any]:
        base = self.gateway_proxy.base_url if through_proxy else self.gateway.base_url
        return gateway_settings(
            base,
            gateway_timeout_seconds=timeout,
            gateway_check_interval=0.2,
            gateway_max_checks=5,
        )

    async def start_api(self, *, timeout: float, webhook: bool = True) -> ApiProcess:
        """`payment-service serve` (2 workers) charging through the gateway proxy, the clients'
        proxy in front of it, the gateway's webhook pointed at it (`webhook`)."""
        self.api = await self.services.api(
            workers=2, **self.gateway_env(through_proxy=True, timeout=timeout)
        )
        self.api_proxy = await FaultProxy(self.api.base_url).start()
        if webhook:
            self.gateway.register_webhook(self.api.base_url + WEBHOOK_PATH, WEBHOOK_SECRET)
        return self.api

    def start_relay(
        self, *, through_proxy: bool = False, timeout: float | None = None, **env: object
    ) -> None:
        """`payment-service relay`, its gateway worker straight to the gateway unless asked."""
        seconds = timeout if timeout is not None else WORKER_TIMEOUT_SECONDS
        settings = {**self.gateway_env(through_proxy=through_proxy, timeout=seconds), **env}
        self.relay = self.services.relay("relay", **settings)

    async def close(self) -> None:
        if self.api_proxy is not None:
            await self.api_proxy.close()

    # -- the end of every test ------------------------------------------------------------------
    async def wait_settled(self, timeout: float = 90) -> None:
        """Until no operation is STARTED or PENDING (each is DONE, or in REVIEW)."""

        async def settled() -> bool:
            open_ = await self.db.fetchval(
                "SELECT count(*) FROM gateway_operations WHERE phase IN ('STARTED', 'PENDING')"
            )
            return bool(open_ == 0)

        try:
            await wait_for(settled, timeout=timeout, what="every gateway operation to finish")
        except AssertionError:
            rows = await self.db.fetch(
                "SELECT operation_id, kind, payment_id, refund_id, phase, intent_id, checks, "
                "locked_until, next_check_at, last_error FROM gateway_operations "
                "WHERE phase IN ('STARTED', 'PENDING') LIMIT 5"
            )
            raise AssertionError(f"open gateway operations: {[dict(r) for r in rows]}") from None

    async def assert_money_and_report(self, test: str, load: MoneyLoad) -> Counts:
        """Every client got its answer; the money agrees at the gateway; check passes; every
        event was delivered; the test's counts go to the report."""
        await self.wait_settled()
        load.assert_answered()
        counts = await assert_money_consistent(
            self.db.dsn, self.gateway.base_url, workdir=self.services.workdir
        )
        await self.services.check()
        # Every event reached both endpoints, in order per payment (repeats only where a process
        # died: exactly_once=False).
        await assert_every_event_delivered(self.services, timeout=60, exactly_once=False)
        assert counts.payments == len(load.flows_started()), (counts, len(load.flows_started()))
        record(
            test,
            counts,
            check="exit 0",
            seconds=time.monotonic() - self.started_at,
            answers=dict(load.answers),
        )
        print(test, counts, dict(load.answers))
        return counts


# -- stopping a process between two phases ------------------------------------------------------
async def held(
    proxy: FaultProxy, match: Matcher, action: Action, *, forwarded: bool, timeout: float = 60
) -> Exchange:
    """Put the rule `action` on the next request that `match`es and wait until the proxy holds
    it (`forwarded`: once the upstream answered — it acted — and the answer is held)."""
    before = len(proxy.exchanges)
    proxy.on(match, action)

    def holding() -> Exchange | None:
        for exchange in proxy.exchanges[before:]:
            acted = not forwarded or exchange.forwarded
            if exchange.action == action.kind and match(exchange.request) and acted:
                return exchange
        return None

    exchange: Exchange = await wait_for(
        holding, timeout=timeout, what=f"a request held by the proxy ({action.kind})"
    )
    return exchange


async def held_first_answer(
    proxy: FaultProxy, match: Matcher, action: Action, *, attempts: int = 10
) -> Exchange:
    """`held` (forwarded) on the API's side, for a request that the API answered 200: it wrote
    its result and the answer is held. One answered otherwise (a 409 while its key is in
    progress, a 202) is let go, and the next one is held."""
    for _ in range(attempts):
        exchange = await held(proxy, match, action, forwarded=True)
        if exchange.upstream_status == 200:
            return exchange
        proxy.release()
        await wait_for(exchange.finished.is_set, timeout=30, what="a released request to end")
    raise AssertionError(f"no request answered 200 in {attempts} tries")


async def end_dead_leases(stack: MoneyStack, phases: tuple[str, ...]) -> list[int]:
    """End the leases of the operations in `phases` whose holder was just killed: what their
    running out would do. Only for a dead holder (the caller killed it) and operations no live
    process holds (the caller waited for the earlier ones to be taken over)."""
    rows = await stack.db.fetch(
        "UPDATE gateway_operations SET locked_until = now() - interval '1 second' "
        "WHERE phase = ANY($1::text[]) AND locked_until > now() RETURNING operation_id",
        list(phases),
    )
    return [row["operation_id"] for row in rows]


async def wait_operations(
    stack: MoneyStack, operation_ids: list[int], *, left_in: tuple[str, ...], what: str
) -> None:
    """Until none of these operations is in a phase of `left_in` any more."""

    async def moved() -> bool:
        left = await stack.db.fetchval(
            "SELECT count(*) FROM gateway_operations "
            "WHERE operation_id = ANY($1::bigint[]) AND phase = ANY($2::text[])",
            operation_ids,
            list(left_in),
        )
        return bool(left == 0)

    await wait_for(moved, timeout=60, what=f"{what}: operations {operation_ids}")


async def wait_taken_over(stack: MoneyStack, operation_ids: list[int]) -> None:
    """Until none of these operations is still waiting for someone to take it on (STARTED)."""
    await wait_operations(
        stack, operation_ids, left_in=("STARTED",), what="the worker to take them over"
    )


# -- the clients ----------------------------------------------------------------------------------
@dataclass
class Flow:
    """One rider's payment and the refunds made of it."""

    number: int
    trip_id: int
    amount: Decimal
    declined: bool  # charged with a card the gateway declines
    refunds: int  # 0, 1 (everything) or 2 (a third, then the rest)
    payment: dict[str, Any] | None = None
    refund_results: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    error: str | None = None


class MoneyLoad:
    """Clients that charge trips at the gateway and refund some of them, through `base_url`.

    Each request is retried with its idempotency key until it gets a definitive answer (2xx or a
    business 4xx); a 202 is followed by reading the payment until it is decided. At most
    `max_flows` flows; `stop()` lets each client finish the flow it is in.
    """

    def __init__(
        self,
        base_url: str,
        *,
        clients: int = 4,
        seed: int = 1,
        max_flows: int = 40,
        declined_method: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.clients = clients
        self.rng = random.Random(seed)
        self.max_flows = max_flows
        self.declined_method = declined_method
        self.flows: list[Flow] = []
        self.answers: Counter[str] = Counter()
        self._numbers = itertools.count(1)
        self._run = f"{seed}-{random.getrandbits(32):08x}"
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None

    def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=CLIENT_TIMEOUT_SECONDS)
        self._tasks = [
            asyncio.create_task(self._client(), name=f"payer-{n}") for n in range(self.clients)
        ]

    def stop(self) -> None:
        self._stop.set()

    async def finish(self, timeout: float = OPERATION_DEADLINE_SECONDS + 30) -> None:
        self.stop()
        await finish_clients(self._tasks, self._http, timeout)

    def flows_started(self) -> list[Flow]:
        return [flow for flow in self.flows if flow.payment is not None]

    def completed(self) -> int:
        return sum(flow.done for flow in self.flows)

    def refunds_made(self) -> int:
        return sum(len(flow.refund_results) for flow in self.flows)

    async def wait_progress(self, flows: int = 3, refunds: int = 0, timeout: float = 90) -> None:
        """Until `flows` more flows completed (and `refunds` more refunds were answered)."""
        target, refunded = self.completed() + flows, self.refunds_made() + refunds
        await wait_for(
            lambda: self.completed() >= target and self.refunds_made() >= refunded,
            timeout=timeout,
            what=f"{flows} more payments and {refunds} more refunds",
        )

    def assert_answered(self) -> None:
        """Every flow ended as the gateway decides it: a good card SUCCESS (then its refunds
        REFUNDED), a declined card FAILED with the gateway's code."""
        broken = [flow for flow in self.flows if flow.error or not flow.done]
        assert not broken, f"{len(broken)} flow(s) did not finish, e.g. {broken[0]}"
        for flow in self.flows:
            assert flow.payment is not None
            if flow.declined:
                assert flow.payment["status"] == "FAILED", flow
                assert flow.payment["failure_code"] == "card_declined", flow
                continue
            expected = {0: "SUCCESS", 1: "REFUNDED", 2: "REFUNDED"}[flow.refunds]
            assert flow.payment["status"] == expected, flow
            assert len(flow.refund_results) == flow.refunds, flow
            assert all(r["status"] == "REFUNDED" for r in flow.refund_results), flow

    # -- one client -------------------------------------------------------------------------------
    async def _client(self) -> None:
        while not self._stop.is_set() and len(self.flows) < self.max_flows:
            number = next(self._numbers)
            declined = self.declined_method is not None and self.rng.random() < 0.15
            flow = Flow(
                number=number,
                trip_id=10_000_000 + number,
                amount=Decimal(self.rng.randint(500, 99_999)) / 100,
                declined=declined,
                refunds=0 if declined else self.rng.choice([0, 1, 2, 2]),
            )
            self.flows.append(flow)
            try:
                await self._flow(flow)
                flow.done = True
            except AssertionError as error:
                flow.error = str(error)
                raise

    async def _flow(self, flow: Flow) -> None:
        prefix = f"{self._run}-{flow.number}"
        body: dict[str, Any] = {
            "trip_id": flow.trip_id,
            "method": "CARD",
            "amount": str(flow.amount),
            "metadata": {"flow": prefix},
        }
        if flow.declined:
            body["payment_method"] = self.declined_method
        status, payment = await self._post(f"{prefix}-pay", "/payments", body)
        flow.payment = payment
        payment_id = payment["payment_id"]
        if status == 202 or payment["status"] == "PENDING":
            flow.payment = await self._until_decided(payment_id, lambda p: p)
        if flow.payment["status"] != "SUCCESS" or flow.refunds == 0:
            return
        amounts: list[str | None] = [None]
        if flow.refunds == 2:
            amounts = [str((flow.amount / 3).quantize(Decimal("0.01"))), None]
        for n, amount in enumerate(amounts, start=1):
            refund_body: dict[str, Any] = {"metadata": {"flow": prefix}}
            if amount is not None:
                refund_body["amount"] = amount
            status, result = await self._post(
                f"{prefix}-refund-{n}", f"/payments/{payment_id}/refunds", refund_body
            )
            if status == 202 or result["status"] == "PENDING":
                result = await self._until_decided(
                    payment_id, functools.partial(_refund_in, refund_id=result["refund_id"])
                )
            flow.refund_results.append(result)
        flow.payment = await self._until_decided(payment_id, lambda p: p)

    async def _post(self, key: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST with this key until a definitive answer; (status, body)."""
        assert self._http is not None
        content = json.dumps({"idempotency_key": key, **body})
        deadline = time.monotonic() + OPERATION_DEADLINE_SECONDS
        for attempt in itertools.count():
            try:
                response = await self._http.post(
                    self.base_url + path,
                    content=content,
                    headers={"Content-Type": "application/json"},
                )
            except httpx.TransportError as error:
                self.answers[type(error).__name__] += 1
            else:
                self.answers[str(response.status_code)] += 1
                document = response.json(parse_float=Decimal) if response.content else None
                if response.status_code in (200, 201, 202):
                    assert isinstance(document, dict), response.text
                    return response.status_code, document
                code = document.get("code") if isinstance(document, dict) else None
                retry = response.status_code >= 500 or response.status_code == 429
                retry = retry or code == "IDEMPOTENCY_KEY_IN_PROGRESS"
                assert retry, f"{path} answered {response.status_code}: {response.text}"
            assert time.monotonic() < deadline, f"{path} with key {key}: no answer in time"
            # A real client's pause between retries, growing a little, at most half a second.
            await asyncio.sleep(min(0.05 * (1 + attempt), 0.5))
        raise AssertionError("unreachable")

    async def _until_decided(
        self, payment_id: int, pick: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]:
        """Read the payment until `pick(payment)` (it, or one of its refunds) is decided."""
        assert self._http is not None
        deadline = time.monotonic() + OPERATION_DEADLINE_SECONDS
        while True:
            with contextlib.suppress(httpx.TransportError):
                response = await self._http.get(f"{self.base_url}/payments/{payment_id}")
                if response.status_code == 200:
                    found = pick(response.json(parse_float=Decimal))
                    if found["status"] != "PENDING":
                        return found
            assert time.monotonic() < deadline, f"payment {payment_id} stayed undecided"
            await asyncio.sleep(0.2)  # a client polling a 202's payment


def _refund_in(payment: dict[str, Any], refund_id: int) -> dict[str, Any]:
    found: dict[str, Any] = next(r for r in payment["refunds"] if r["refund_id"] == refund_id)
    return found


# -- fixtures -------------------------------------------------------------------------------------
async def declined_card(gateway: EmbeddedGateway) -> str:
    """A payment method the gateway declines when charged."""
    return await make_payment_method(gateway.base_url, card="4000000000000341")
