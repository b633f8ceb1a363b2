"""The gateway worker: finishes the charges and refunds that nobody finished.

A charge or refund is staged by the API, which makes its calls to the gateway under a lease and
writes the result (payment_service.money). When the API crashed, lost its connection, or the
gateway did not decide in time (the request answered 202), the operation waits in
`gateway_operations`; this worker claims the due ones (`FOR UPDATE SKIP LOCKED` and a lease, as
the relay claims deliveries, so any number of relays may run it) and takes each one on from
where it stands, with the same code the API runs:
- a charge with no intent recorded is created again (the same idempotency key: Stripe answers
  the first intent; a gateway that ignores keys makes a second one, which is never confirmed);
- a charge with an intent: the gateway is asked about it and the worker acts on its status
  (confirms it if it was never confirmed, cancels one that needs the payer's authentication,
  records a decision);
- a refund: looked for at the gateway by our id, made (again) only when it is not there.
An outcome still undecided is asked about again later, the wait doubling each time (from
GATEWAY_CHECK_INTERVAL up to an hour). An operation whose outcome could not be learnt
GATEWAY_MAX_CHECKS times in a row is flagged for review (phase REVIEW; the metric
`gateway_review_payments`, `payment-service gateway review`), never failed: the gateway may have
charged it. It is still asked about hourly, and finishes by itself once the gateway answers.

When the operation's request answered nothing (the API crashed), the result written here is the
answer its idempotency key replays to the client's retry. The worker runs only with
GATEWAY=stripe. On stop it takes nothing more and lets the operations in hand finish within the
relay's shutdown grace; one cut short keeps its lease, which runs out.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg

from outbox_relay.state import RelayState, error_text, wait_for
from payment_service.database import UNAVAILABLE_ERRORS, acquire, create_pool
from payment_service.gateway.interface import Gateway
from payment_service.money import charges, operations, refunds, review
from payment_service.money.operations import Operation
from payment_service.money.results import Decided, LeaseLost, Undecided
from payment_service.money.schedule import check_delay

logger = logging.getLogger(__name__)

BATCH_SIZE = 20  # operations claimed at once
CONCURRENCY = 8  # operations in hand at once (each makes a call or two to the gateway)
POOL_SIZE = 4  # its own connections: a slow gateway never holds the relay's
REVIEW_GAUGE_SECONDS = 5.0


class GatewayWorker:
    def __init__(self, state: RelayState, gateway: Gateway) -> None:
        self.state = state
        self.gateway = gateway
        settings = state.settings
        self.lease_seconds = operations.lease_seconds(settings.gateway_timeout_seconds)
        self.first_check_seconds = settings.gateway_check_interval
        self.max_checks = settings.gateway_max_checks
        self.poll_seconds = settings.relay_poll_interval
        self.pool: asyncpg.Pool | None = None
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._review_read_at = 0.0

    async def run(self) -> None:
        """Claim and finish due operations until the relay stops."""
        if self.pool is None:
            self.pool = await create_pool(self.state.settings.dsn(), min_size=0, max_size=POOL_SIZE)
        stop = self.state.stop
        while not stop.is_set():
            claimed = await self._claim()
            if claimed:
                await asyncio.gather(*(self._take_on(operation) for operation in claimed))
            await self._read_review_gauge()
            if len(claimed) < BATCH_SIZE:
                await wait_for(stop, await self._rest())

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        await self.gateway.close()

    async def _claim(self) -> list[Operation]:
        assert self.pool is not None
        async with acquire(self.pool) as conn:
            return await operations.claim_due(
                conn, limit=BATCH_SIZE, lease_seconds=self.lease_seconds, claim_token=uuid.uuid4()
            )

    async def _rest(self) -> float:
        """Until the next operation is due, at most the poll interval."""
        assert self.pool is not None
        async with acquire(self.pool) as conn:
            due = await operations.seconds_until_due(conn)
        return self.poll_seconds if due is None else min(max(due, 0.05), self.poll_seconds)

    async def _read_review_gauge(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._review_read_at < REVIEW_GAUGE_SECONDS:
            return
        self._review_read_at = loop.time()
        assert self.pool is not None
        async with acquire(self.pool) as conn:
            self.state.metrics.gateway_review.set(await review.count_review(conn))

    async def _take_on(self, operation: Operation) -> None:
        async with self._slots:
            try:
                if operation.kind == "CHARGE":
                    await self._charge(operation)
                else:
                    await self._refund(operation)
            except UNAVAILABLE_ERRORS as error:
                logger.warning(
                    "database unavailable; the operation's lease runs out and it is taken again",
                    extra={"operation_id": operation.operation_id, "error": error_text(error)},
                )
            except Exception:
                logger.exception(
                    "gateway operation failed; its lease runs out and it is taken again",
                    extra={"operation_id": operation.operation_id},
                )

    async def _charge(self, operation: Operation) -> None:
        assert self.pool is not None
        verdict = await charges.make_charge(
            self.pool, self.gateway, operation, lease_seconds=self.lease_seconds
        )
        match verdict:
            case Decided():
                await charges.finish_charge(self.pool, operation, verdict)
                self._count(operation, "decided")
                self.state.wake_lanes()  # its event is committed
            case Undecided():
                self._count(operation, "unknown" if verdict.unknown else "processing")
                if operation.phase == "STARTED":
                    await charges.hand_over_charge(
                        self.pool,
                        operation,
                        verdict,
                        delay_seconds=self._delay(operation),
                        checked=True,
                    )
                    self.state.wake_lanes()  # payment.pending is committed
                else:
                    await self._reschedule(operation, verdict.reason, unknown=verdict.unknown)
            case LeaseLost():
                self._count(operation, "lease_lost")

    async def _refund(self, operation: Operation) -> None:
        assert self.pool is not None
        verdict = await refunds.make_refund(
            self.pool,
            self.gateway,
            operation,
            lease_seconds=self.lease_seconds,
            first_call=False,
        )
        match verdict:
            case Decided():
                await refunds.finish_refund(self.pool, operation, verdict)
                self._count(operation, "decided")
                self.state.wake_lanes()
            case Undecided():
                self._count(operation, "unknown" if verdict.unknown else "processing")
                if operation.phase == "STARTED":
                    await refunds.hand_over_refund(
                        self.pool,
                        operation,
                        verdict,
                        delay_seconds=self._delay(operation),
                        checked=True,
                    )
                    return
                if verdict.gateway_id is not None:
                    async with acquire(self.pool) as conn:
                        await operations.record_refund_id(
                            conn,
                            operation_id=operation.operation_id,
                            claim_token=operation.claim_token,
                            gateway_refund_id=verdict.gateway_id,
                        )
                await self._reschedule(operation, verdict.reason, unknown=verdict.unknown)
            case LeaseLost():
                self._count(operation, "lease_lost")

    def _delay(self, operation: Operation) -> float:
        return check_delay(self.first_check_seconds, operation.checks + 1)

    async def _reschedule(self, operation: Operation, reason: str, *, unknown: bool) -> None:
        assert self.pool is not None
        async with acquire(self.pool) as conn:
            phase = await operations.reschedule(
                conn,
                operation_id=operation.operation_id,
                claim_token=operation.claim_token,
                delay_seconds=self._delay(operation),
                unknown=unknown,
                reason=reason,
                max_checks=self.max_checks,
            )
        if phase == "REVIEW" and operation.phase != "REVIEW":
            logger.warning(
                "gateway outcome still unknown: flagged for review",
                extra={
                    "operation_id": operation.operation_id,
                    "kind": operation.kind.lower(),
                    "payment_id": operation.payment_id,
                    "refund_id": operation.refund_id,
                    "reason": reason,
                    "checks": operation.unknown_checks + 1,
                },
            )

    def _count(self, operation: Operation, result: str) -> None:
        self.state.metrics.gateway_checks.labels(operation.kind.lower(), result).inc()
