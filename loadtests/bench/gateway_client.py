"""Client CPU per gateway call, by the SDK's HTTP client: what chose the adapter's.

    python -m loadtests.bench.gateway_client [--calls 300] [--rounds 2]

Starts the embedded gateway, then for each HTTP client the SDK offers (HTTPX, its default, and
aiohttp) drives the Stripe adapter through `--calls` charges (create an intent, confirm it) one
after another, and reports this process's CPU time per call (`time.process_time`: the client's
own work, not the gateway's, which runs in its own process). Wall time is not reported: it is
the gateway's, which writes all its objects to disk after every change and so slows down as they
pile up; they are cleared every CLEAR_EVERY charges, between measured calls. Rounds alternate the
clients, so that a machine that warms up or gets busier does not favour one. Figures from a busy
machine say little; compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from decimal import Decimal

import aiohttp
import stripe

from payment_service.gateway.embedded import EmbeddedGateway
from payment_service.gateway.interface import ChargeRequest
from payment_service.gateway.stripe_adapter import StripeGateway

TIMEOUT_SECONDS = 10
WARM_UP_CALLS = 20
CLEAR_EVERY = 50  # charges

CLIENTS: dict[str, Callable[[], stripe.HTTPClient]] = {
    "httpx": lambda: stripe.HTTPXClient(timeout=TIMEOUT_SECONDS),
    "aiohttp": lambda: stripe.AIOHTTPClient(timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)),
}


async def measure(
    embedded: EmbeddedGateway, client: str, calls: int, first_id: int
) -> tuple[float, float]:
    """CPU ms per create, CPU ms per confirm."""
    gateway = StripeGateway(
        api_key=embedded.api_key,
        api_base=embedded.base_url,
        webhook_secret=None,
        timeout_seconds=TIMEOUT_SECONDS,
        api_flavour="localstripe",
        http_client=CLIENTS[client](),
    )
    try:
        for n in range(WARM_UP_CALLS):
            await gateway.create_intent(_charge(first_id - n - 1))
        embedded.clear()
        create_cpu = confirm_cpu = 0.0
        for n in range(calls):
            if n and n % CLEAR_EVERY == 0:
                embedded.clear()
            payment_id = first_id + n
            started = time.process_time()
            intent = await gateway.create_intent(_charge(payment_id))
            created = time.process_time()
            await gateway.confirm(intent.id, payment_id=payment_id, saved_method=False)
            create_cpu += created - started
            confirm_cpu += time.process_time() - created
    finally:
        await gateway.close()
        embedded.clear()
    return create_cpu / calls * 1000, confirm_cpu / calls * 1000


def _charge(payment_id: int) -> ChargeRequest:
    return ChargeRequest(
        payment_id=payment_id,
        trip_id=payment_id,
        reference=f"PAY-BENCH-{payment_id:08x}",
        amount=Decimal("150.00"),
        currency="INR",
        method="CARD",
        payment_method="pm_card_visa",
    )


async def run(calls: int, rounds: int) -> None:
    embedded = EmbeddedGateway()
    embedded.start()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in CLIENTS}
    try:
        next_id = 1_000_000
        for round_ in range(rounds):
            order = list(CLIENTS) if round_ % 2 == 0 else list(reversed(CLIENTS))
            for name in order:
                results[name].append(await measure(embedded, name, calls, next_id))
                next_id += calls + WARM_UP_CALLS + 1
    finally:
        embedded.stop()
    print(f"{calls} charges (create + confirm) per run, {rounds} run(s) per client; best run:")
    print(f"{'client':<8} {'CPU/create':>11} {'CPU/confirm':>12}")
    for name, runs in results.items():
        create, confirm = min(runs, key=sum)
        print(f"{name:<8} {create:>8.2f} ms {confirm:>9.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="charges per run (default 300)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per client (default 2)")
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.rounds))


if __name__ == "__main__":
    main()
