"""Waits on a condition with a deadline: never a sleep standing in for synchronisation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any


async def wait_until(
    predicate: Callable[[], Any], *, timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll an (async or sync) predicate until it returns a truthy value; fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def wait_for(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05
) -> Any:
    """`wait_until`, naming what was awaited when the deadline passes."""
    try:
        return await wait_until(predicate, timeout=timeout, interval=interval)
    except AssertionError as error:
        if not str(error).startswith("condition not met"):
            raise  # the predicate's own assertion
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None


async def port_closed(port: int) -> bool:
    """Nothing accepts connections on 127.0.0.1:`port`."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False
