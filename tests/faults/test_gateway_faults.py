"""Money moves exactly once at a real gateway through crashes, lost answers and a slow gateway.

Real processes: `payment-service serve` (2 workers) and `payment-service relay` (its gateway worker)
against a real PostgreSQL and a real `localstripe` process of the test's own, a fault proxy in front
of the gateway and one in front of the API; clients pay and refund under load, retrying each
request with its idempotency key (tests/faults/gateway_harness.py).

- kill -9 of the API after each phase of a charge, and of a refund;
- the gateway's answer lost after it acted, a 500 without acting, a 500 after acting, a call that
  hangs past GATEWAY_TIMEOUT_SECONDS: on the create, the confirm and the refund;
- kill -9 of the relay while its gateway worker asks the gateway about an unknown outcome (an
  intent, a refund), and while it makes the call the API could not (a confirm, a refund).

After each, every client got its final answer, and `assert_money_and_report` proves at the
gateway (tests/support/money_checks.py): at most one confirmed intent per payment, at most one
gateway refund per refund, every payment final or flagged for review, none FAILED while the
gateway charged it, reconciliation agrees both ways (and `payment-service reconcile` where the CLI
has it), `payment-service check` passes. What each test counted goes to GATEWAY_FAULT_REPORT.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.gateway_harness import (
    CONFIRM,
    CREATE,
    FIND_REFUND,
    LONG_TIMEOUT_SECONDS,
    PAY,
    PAY_REFUND,
    REFUND,
    RETRIEVE,
    MoneyLoad,
    MoneyStack,
    declined_card,
    end_dead_leases,
    held,
    held_first_answer,
    wait_operations,
    wait_taken_over,
)
from tests.support.fault_proxy import (
    DROP_AFTER_FORWARD,
    HANG,
    HANG_BEFORE_FORWARD,
    Action,
    Matcher,
    answer,
    delay,
    forward_then_answer,
    matching,
)
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# (what the API had done when it died, which proxy holds, the request held, how, forwarded)
Phase = tuple[str, str, Matcher, Action, bool]
CHARGE_PHASES: list[Phase] = [
    ("staged, no call made", "gateway", CREATE, HANG_BEFORE_FORWARD, False),
    ("intent created, its id not recorded", "gateway", CREATE, HANG, True),
    ("intent recorded, not confirmed", "gateway", CONFIRM, HANG_BEFORE_FORWARD, False),
    ("confirmed at the gateway, result not written", "gateway", CONFIRM, HANG, True),
    ("result written, the client not answered", "api", PAY, HANG, True),
]
REFUND_PHASES: list[Phase] = [
    ("refund staged, no call made", "gateway", REFUND, HANG_BEFORE_FORWARD, False),
    ("refunded at the gateway, result not written", "gateway", REFUND, HANG, True),
    ("refund written, the client not answered", "api", PAY_REFUND, HANG, True),
]


async def start_under_load(
    stack: MoneyStack, timeout: float, *, seed: int, declines: bool
) -> MoneyLoad:
    """The API (with this gateway time-out) and the relay started, 4 clients paying through the
    API's proxy (some with a card the gateway declines)."""
    await stack.start_api(timeout=timeout)
    stack.start_relay()
    assert stack.api_proxy is not None
    declined = await declined_card(stack.gateway) if declines else None
    load = MoneyLoad(
        stack.api_proxy.base_url, clients=4, seed=seed, max_flows=120, declined_method=declined
    )
    load.start()
    return load


async def kill_api_after_each(stack: MoneyStack, load: MoneyLoad, phases: list[Phase]) -> None:
    """For each phase: hold the call that starts the next one, kill -9 the API while it is held,
    end the dead API's leases, start the API again; the load goes on throughout."""
    api = stack.api
    assert api is not None and stack.api_proxy is not None
    taken: list[int] = []
    for name, where, match, action, forwarded in phases:
        # The last crash's operations are in the worker's hands: every lease left now is the
        # live API's.
        await wait_taken_over(stack, taken)
        proxy = stack.gateway_proxy if where == "gateway" else stack.api_proxy
        if where == "api":
            exchange = await held_first_answer(proxy, match, action)
        else:
            exchange = await held(proxy, match, action, forwarded=forwarded)
        await api.kill9()
        proxy.release()
        await wait_for(exchange.finished.is_set, timeout=30, what="the held request to end")
        assert exchange.forwarded == int(forwarded), (name, exchange)
        assert exchange.answered is None, (name, exchange)  # the API (or client) heard nothing
        taken = await end_dead_leases(stack, ("STARTED",))
        print(f"killed the API: {name}; it held operations {taken}")
        api.start()
        await api.wait_ready()
        await load.wait_progress(flows=2)
    await wait_taken_over(stack, taken)


@pytest.mark.parametrize(
    ("phases", "seed"), [(CHARGE_PHASES, 11), (REFUND_PHASES, 12)], ids=["charge", "refund"]
)
async def test_kill_9_of_the_api_after_each_phase(
    money_stack: MoneyStack, request: pytest.FixtureRequest, phases: list[Phase], seed: int
) -> None:
    stack = money_stack
    charges = phases is CHARGE_PHASES
    load = await start_under_load(stack, LONG_TIMEOUT_SECONDS, seed=seed, declines=charges)
    try:
        await load.wait_progress(flows=2, refunds=0 if charges else 1)
        await kill_api_after_each(stack, load, phases)
    finally:
        await load.finish()
    counts = await stack.assert_money_and_report(request.node.name, load)
    assert stack.api is not None and stack.api.starts == len(phases) + 1
    if charges:
        # The create whose answer died with the API left an intent nobody confirmed.
        assert counts.orphan_intents >= 1, counts


# -- the gateway misbehaves: no process dies ------------------------------------------------------
# (the fault, the request, the proxy's action, whether the gateway acted)
Fault = tuple[str, Matcher, Action, bool]
CHARGE_FAULTS: list[Fault] = [
    ("create answered 500, not made", CREATE, answer(500), False),
    ("create made, its answer dropped", CREATE, DROP_AFTER_FORWARD, True),
    ("confirm made, its answer dropped", CONFIRM, DROP_AFTER_FORWARD, True),
    ("confirm made, answered 500", CONFIRM, forward_then_answer(500), True),
    ("confirm answered 500, not made", CONFIRM, answer(500), False),
    ("confirm made, hangs past the time-out", CONFIRM, HANG, True),
]
REFUND_FAULTS: list[Fault] = [
    ("refund answered 500, not made", REFUND, answer(500), False),
    ("refund made, its answer dropped", REFUND, DROP_AFTER_FORWARD, True),
    ("refund made, answered 500", REFUND, forward_then_answer(500), True),
    ("refund made, hangs past the time-out", REFUND, HANG, True),
]
SHORT_TIMEOUT_SECONDS = 1


async def fault_each(stack: MoneyStack, load: MoneyLoad, faults: list[Fault]) -> None:
    for name, match, action, acted in faults:
        exchange = await held(stack.gateway_proxy, match, action, forwarded=False)
        # A hang ends when the API gives up on the call (its time-out), the others at once.
        await wait_for(exchange.finished.is_set, timeout=60, what=f"the fault: {name}")
        assert exchange.forwarded == int(acted), (name, exchange)
        print(f"fault: {name}: answered {exchange.answered}, upstream {exchange.upstream_status}")
        await load.wait_progress(flows=1)


@pytest.mark.parametrize(
    "faults", [CHARGE_FAULTS, REFUND_FAULTS], ids=["charge-faults", "refund-faults"]
)
async def test_the_gateway_loses_answers_fails_and_hangs(
    money_stack: MoneyStack, request: pytest.FixtureRequest, faults: list[Fault]
) -> None:
    stack = money_stack
    declines = faults is CHARGE_FAULTS
    load = await start_under_load(stack, SHORT_TIMEOUT_SECONDS, seed=13, declines=declines)
    try:
        await load.wait_progress(flows=2)
        await fault_each(stack, load, faults)
    finally:
        await load.finish()
    counts = await stack.assert_money_and_report(request.node.name, load)
    assert counts.review_flagged == 0, counts  # the gateway answered the worker every time


# -- kill -9 of the relay while its worker asks the gateway -------------------------------------
async def test_kill_9_of_the_relay_mid_check(
    money_stack: MoneyStack, request: pytest.FixtureRequest
) -> None:
    """The API's call fails (the gateway acted, or not); the worker's check of the intent or
    refund — or its confirm — is held at the proxy while the relay is killed; a new relay takes
    the operation over and finishes it, never charging or refunding twice."""
    stack = money_stack
    # No webhook: the worker alone finishes what the API left.
    await stack.start_api(timeout=SHORT_TIMEOUT_SECONDS, webhook=False)
    # Its deliveries' leases short too: the dead relay's claimed callbacks come back soon.
    stack.start_relay(through_proxy=True, timeout=LONG_TIMEOUT_SECONDS, relay_lease_seconds=3)
    relay = stack.relay
    assert relay is not None and stack.api_proxy is not None
    proxy = stack.gateway_proxy
    load = MoneyLoad(stack.api_proxy.base_url, clients=2, seed=14, max_flows=120)
    load.start()
    try:
        await load.wait_progress(flows=2, refunds=1)
        # 1. The gateway charged, the API heard 500: the worker's retrieve of the intent.
        # 2. The gateway refunded, the API heard 500: the worker's search for the refund.
        for what, api_fault, check in [
            ("retrieving a charged intent", (CONFIRM, forward_then_answer(500)), RETRIEVE),
            ("looking for a made refund", (REFUND, forward_then_answer(500)), FIND_REFUND),
        ]:
            proxy.on(*api_fault)
            checking = await held(proxy, check, HANG_BEFORE_FORWARD, forwarded=False)
            await kill_relay_and_restart(stack, checking, what)
        # 3. The confirm (4. the refund) was never made (500): the worker asks the gateway
        # (held until the test knows which intent or refund it is about), then makes the call
        # itself; the gateway acts, its answer is held, and the relay dies.
        for what, call, check in [
            ("confirming an intent", CONFIRM, RETRIEVE),
            ("making a refund", REFUND, FIND_REFUND),
        ]:
            asking = proxy.on(check, delay(60))
            failed = await held(proxy, call, answer(500), forwarded=False)
            # The worker's call: the same path and body as the API's.
            again = matching("POST", failed.request.path, body=failed.request.body)
            await wait_for(lambda: asking.hits >= 1, timeout=60, what="the worker's check")  # noqa: B023
            proxy.on(again, HANG)
            proxy.release()
            exchange = await wait_for(
                lambda: next((e for e in proxy.matching_exchanges(again) if e.forwarded), None),  # noqa: B023
                timeout=60,
                what=f"the worker's call {what} to reach the gateway",
            )
            await kill_relay_and_restart(stack, exchange, what)
        await load.wait_progress(flows=2)
    finally:
        await load.finish()
    await stack.assert_money_and_report(request.node.name, load)
    assert relay.starts == 5


async def kill_relay_and_restart(stack: MoneyStack, exchange: Any, what: str) -> None:
    relay = stack.relay
    assert relay is not None
    await relay.kill9()
    await wait_for(exchange.finished.is_set, timeout=30, what="the held request to end")
    assert exchange.answered is None, exchange  # the worker heard nothing
    # The operations the dead relay held (the API holds STARTED ones, never these).
    taken = await end_dead_leases(stack, ("PENDING", "REVIEW"))
    print(f"killed the relay {what}; it held operations {taken}")
    assert taken, f"the relay held nothing while {what}"
    relay.start()
    await wait_operations(
        stack, taken, left_in=("STARTED", "PENDING", "REVIEW"), what="the new relay to finish"
    )
