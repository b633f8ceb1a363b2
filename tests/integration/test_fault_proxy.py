"""The fault-injecting proxy itself, between an httpx client and the test receiver: each action
does to a request what it says, and only to the requests its rule matches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.fault_proxy import (
    DROP_AFTER_FORWARD,
    HANG,
    HANG_BEFORE_FORWARD,
    REORDER,
    Action,
    FaultProxy,
    answer,
    delay,
    fault_proxy,
    forward_then_answer,
    matching,
    repeat,
)
from tests.support.receiver import Receiver, answer_status
from tests.support.waiting import wait_for

PATH = "/notifications"


@pytest.fixture(name="proxy")
async def proxy_fixture(receiver: Receiver) -> AsyncIterator[FaultProxy]:
    async with fault_proxy(receiver.base_url) as proxy:
        yield proxy


@pytest.fixture(name="client")
async def client_fixture(proxy: FaultProxy) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxy.base_url, timeout=5) as client:
        yield client


def bodies(receiver: Receiver) -> list[bytes]:
    return [d.body for d in receiver.deliveries]


async def test_requests_pass_through_unchanged(
    client: httpx.AsyncClient, proxy: FaultProxy, receiver: Receiver
) -> None:
    receiver.policy = answer_status(201, (("X-Answer", "yes"),))

    response = await client.post(PATH + "?a=1", content=b"hello", headers={"X-Test": "1"})

    assert response.status_code == 201 and response.headers["x-answer"] == "yes"
    assert response.json() == {"error": "test"}
    assert bodies(receiver) == [b"hello"]
    assert receiver.deliveries[0].headers["x-test"] == "1"
    (exchange,) = proxy.exchanges
    assert (exchange.action, exchange.forwarded, exchange.upstream_status, exchange.answered) == (
        "forward",
        1,
        201,
        201,
    )
    assert exchange.request.target == PATH + "?a=1"


async def test_drop_after_forward_loses_the_answer_of_a_request_that_arrived(
    client: httpx.AsyncClient, proxy: FaultProxy, receiver: Receiver
) -> None:
    proxy.on(matching("POST", PATH), DROP_AFTER_FORWARD)

    with pytest.raises(httpx.RemoteProtocolError):
        await client.post(PATH, content=b"charge")

    assert bodies(receiver) == [b"charge"] and receiver.deliveries[0].accepted
    assert proxy.exchanges[0].answered is None
    # The rule is spent: the next request passes.
    assert (await client.post(PATH, content=b"again")).status_code == 200


async def test_answer_never_reaches_the_upstream(
    client: httpx.AsyncClient, proxy: FaultProxy, receiver: Receiver
) -> None:
    proxy.on(matching(path=PATH), answer(503), times=2)

    statuses = [(await client.post(PATH, content=b"x")).status_code for _ in range(3)]

    assert statuses == [503, 503, 200]
    assert len(receiver.deliveries) == 1


async def test_forward_then_answer_hides_the_upstreams_answer(
    client: httpx.AsyncClient, proxy: FaultProxy, receiver: Receiver
) -> None:
    proxy.on(matching("POST"), forward_then_answer(500))

    response = await client.post(PATH, content=b"x")

    assert response.status_code == 500
    assert receiver.deliveries[0].accepted
    assert (proxy.exchanges[0].upstream_status, proxy.exchanges[0].answered) == (200, 500)


@pytest.mark.parametrize(("action", "forwarded"), [(HANG, 1), (HANG_BEFORE_FORWARD, 0)])
async def test_a_hang_holds_the_answer_past_the_clients_time_out(
    proxy: FaultProxy, receiver: Receiver, action: Action, forwarded: int
) -> None:
    proxy.on(matching("POST"), action)
    async with httpx.AsyncClient(base_url=proxy.base_url, timeout=0.5) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(PATH, content=b"x")

    await wait_for(lambda: proxy.exchanges[0].finished.is_set(), timeout=10, what="the hang to end")
    assert proxy.exchanges[0].client_hung_up
    assert len(receiver.deliveries) == forwarded, "forwarded: the upstream acted"


async def test_repeat_delivers_a_request_twice(
    client: httpx.AsyncClient, proxy: FaultProxy, receiver: Receiver
) -> None:
    proxy.on(matching(body=b"evt_1"), repeat(2))

    assert (await client.post(PATH, content=b'{"id": "evt_1"}')).status_code == 200
    assert (await client.post(PATH, content=b'{"id": "evt_2"}')).status_code == 200

    assert bodies(receiver) == [b'{"id": "evt_1"}', b'{"id": "evt_1"}', b'{"id": "evt_2"}']


async def test_delay_holds_a_request_until_released(
    client: httpx.AsyncClient, proxy: FaultProxy, receiver: Receiver
) -> None:
    proxy.on(matching(body=b"late"), delay(30))
    late = asyncio.ensure_future(client.post(PATH, content=b"late"))
    await wait_for(lambda: proxy.exchanges, timeout=5, what="the late request to arrive")
    assert (await client.post(PATH, content=b"early")).status_code == 200
    assert bodies(receiver) == [b"early"]

    proxy.release()

    assert (await late).status_code == 200
    assert bodies(receiver) == [b"early", b"late"]


async def test_reorder_delivers_two_requests_in_the_opposite_order(
    client: httpx.AsyncClient, proxy: FaultProxy, receiver: Receiver
) -> None:
    proxy.on(matching("POST", PATH), REORDER, times=2)

    first = asyncio.ensure_future(client.post(PATH, content=b"first"))
    await wait_for(lambda: proxy.exchanges, timeout=5, what="the first request to arrive")
    second = await client.post(PATH, content=b"second")

    assert second.status_code == 200 and (await first).status_code == 200
    assert bodies(receiver) == [b"second", b"first"]
