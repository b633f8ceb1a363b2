"""`payment-service reconcile --since T [--until T] [--json]`: our charges and refunds against the
gateway's over a window, both ways (payment_service.money.reconcile says what is compared).

Exit codes: 0 no difference, 1 differences (each named on stdout), 2 the command cannot run as
asked (a time that is not ISO-8601 with a timezone, a window out of range, no gateway configured),
3 the comparison could not be made (the gateway or the database did not answer). Progress goes to
stderr for windows longer than a day.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta

from payment_cli.actions import add_action, fail
from payment_service.config import Settings
from payment_service.database import UNAVAILABLE_ERRORS, connect
from payment_service.entry import PROGRAM, database_settings, printable
from payment_service.gateway.factory import gateway_from_settings
from payment_service.gateway.interface import GatewayError, GatewayOutcomeUnknown
from payment_service.money.reconcile import Reconciliation, WindowError, check_window, reconcile

# The exit code when nothing could be compared (neither a difference nor a usage error).
NOT_COMPARED_EXIT = 3
# Windows longer than this print their progress on stderr.
PROGRESS_WINDOW = timedelta(days=1)


def parse_time(text: str, option: str) -> datetime:
    """An ISO-8601 time with its timezone (`Z` or an offset); `WindowError` says why not."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise WindowError(
            f"{option} {text[:60]!r} is not an ISO-8601 time (e.g. 2026-01-31T00:00:00Z)"
        ) from None
    if value.tzinfo is None:
        raise WindowError(
            f"{option} {text[:60]!r} has no timezone (add Z or an offset, e.g. +05:30)"
        )
    return value.astimezone(UTC)


async def _run(settings: Settings, since: datetime, until: datetime) -> Reconciliation:
    gateway = gateway_from_settings(settings)
    assert gateway is not None

    def progress(message: str) -> None:
        print(f"{PROGRAM}: {printable(message)}", file=sys.stderr, flush=True)

    try:
        conn = await connect(settings.dsn())
        try:
            return await reconcile(
                conn,
                gateway,
                since=since,
                until=until,
                progress=progress if until - since > PROGRESS_WINDOW else None,
            )
        finally:
            await conn.close()
    finally:
        await gateway.close()


def print_report(result: Reconciliation) -> None:
    """The report as text, every value from outside escaped."""
    print(
        f"reconciled {result.since.isoformat()} .. {result.until.isoformat()}: "
        f"{result.payments} charges and {result.refunds} refunds of ours, {result.intents} "
        f"intents and {result.gateway_refunds} refunds at the gateway"
    )
    for title, findings in (("difference", result.differences), ("note", result.notes)):
        for finding in findings:
            ids = ", ".join(
                f"{name} {value}"
                for name, value in (
                    ("payment", finding.payment_id),
                    ("refund", finding.refund_id),
                    ("intent", finding.intent_id),
                    ("gateway refund", finding.gateway_refund_id),
                )
                if value is not None
            )
            print(printable(f"  {title}: {finding.kind.value} ({ids}): {finding.detail}"))
    if result.differences:
        print(f"{len(result.differences)} difference(s)")
    else:
        print("no difference")


def run_reconcile(
    settings: Settings, *, since: str, until: str | None, as_json: bool = False
) -> int:
    try:
        start = parse_time(since, "--since")
        now = datetime.now(UTC)
        end = parse_time(until, "--until") if until is not None else now
        check_window(start, min(end, now), now=now)
    except WindowError as error:
        return fail(str(error))
    if settings.gateway == "none":
        return fail("no gateway is configured (GATEWAY=none): there is nothing to reconcile with")
    end = min(end, now)  # the gateway holds nothing from the future
    try:
        result = asyncio.run(_run(settings, start, end))
    except GatewayOutcomeUnknown as error:
        return fail(
            f"the gateway did not answer ({error.reason}): nothing was compared", NOT_COMPARED_EXIT
        )
    except GatewayError as error:
        return fail(
            f"the gateway refused to list: {error}; nothing was compared", NOT_COMPARED_EXIT
        )
    except UNAVAILABLE_ERRORS as error:
        return fail(f"the database is not reachable: {error}", NOT_COMPARED_EXIT)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_report(result)
    return 0 if result.consistent else 1


def cmd_reconcile(args: argparse.Namespace) -> int:
    return run_reconcile(database_settings(), since=args.since, until=args.until, as_json=args.json)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `reconcile` to the `payment-service` parser."""
    reconcile_parser = add_action(
        commands,
        "reconcile",
        cmd_reconcile,
        "Compare our charges and refunds made at the gateway in a window with the gateway's "
        "intents and refunds, both ways: a charged payment without a succeeded intent, an intent "
        "that charged a payment we hold FAILED or do not know, amounts, refunds missing on "
        "either side, a payment confirmed twice. Payments and refunds still PENDING and intents "
        "never confirmed are listed as notes, not differences. Exit 0: no difference; 1: "
        "differences; 2: a bad time or no gateway configured; 3: the gateway or the database "
        "did not answer.",
    )
    reconcile_parser.add_argument(
        "--since",
        required=True,
        metavar="TIME",
        help="start of the window, ISO-8601 with a timezone (e.g. 2026-01-31T00:00:00Z)",
    )
    reconcile_parser.add_argument(
        "--until",
        metavar="TIME",
        help="end of the window (excluded), ISO-8601 with a timezone (default: now; a later "
        "time counts as now)",
    )
    reconcile_parser.add_argument("--json", action="store_true", help="machine-readable report")
