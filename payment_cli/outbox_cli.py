"""`payment-service outbox stats | dead | replay`: look at and operate the deliveries, per endpoint.

Thin commands over payment_service.deliveries, which holds the SQL: each command parses its
arguments, runs one function on one connection and prints the outcome, every value from the
database escaped (`printable`): a dead delivery's last error is a receiver's answer. Unknown
endpoints and bad input exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg

from payment_cli.actions import Handler, add_action, fail
from payment_service import deliveries
from payment_service.database import run_with_connection
from payment_service.deliveries import COUNTS, DeliveryCounts
from payment_service.endpoints import EndpointNotFound
from payment_service.entry import PROGRAM, printable
from payment_service.entry import database_settings as _database_settings

T = TypeVar("T")


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


# -- commands -------------------------------------------------------------------------------------
def _run(action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    return run_with_connection(_database_settings().dsn(), action)


def cmd_stats(args: argparse.Namespace) -> int:
    """Deliveries per endpoint by status, the oldest pending age, breaker and state."""
    stats = _run(deliveries.select_stats)
    if args.json:
        print(json.dumps(stats.public()))
        return 0
    header = ("endpoint", "state", "breaker", *COUNTS, "oldest pending")

    def row(name: str, state: str, breaker: str, counts: DeliveryCounts) -> tuple[str, ...]:
        numbers = (str(getattr(counts, key)) for key in COUNTS)
        return (name, state, breaker, *numbers, _age(counts.oldest_pending_age_seconds))

    rows = [row(e.name, e.state, e.breaker, e.counts) for e in stats.endpoints]
    rows.append(row("all", "", "", stats.totals))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for line in (header, *rows):
        print(
            printable(
                "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            ).rstrip()
        )
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    """List dead deliveries (to one endpoint, or all), newest first."""
    if args.limit < 1:
        return fail("--limit must be at least 1")

    async def select(conn: asyncpg.Connection) -> list[deliveries.DeadDelivery]:
        return await deliveries.select_dead(conn, endpoint=args.endpoint, limit=args.limit)

    dead = _run(select)
    if args.json:
        print(json.dumps([d.public() for d in dead], default=_json_default))
        return 0
    if not dead:
        print("no dead deliveries")
        return 0
    for d in dead:
        # last_error holds the receiver's answer: printed escaped, it cannot drive the terminal
        print(
            printable(
                f"{d.endpoint:<14} {d.event_id}  {d.event_type:<18} payment "
                f"{d.payment_id:<8} attempts {d.attempts:<3} last "
                f"{d.last_status_code or '-'}  {d.last_error or ''}"
            )
        )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """A range replay (`--endpoint N --since T [--until T]`), or one of dead deliveries."""
    if args.since is not None or args.until is not None:
        if args.event_id is not None or args.dead:
            return fail("--since/--until replace --event-id and --dead")
        if args.endpoint is None or args.since is None:
            return fail("a range replay needs --endpoint N --since T")
        return _replay_range(args.endpoint, since=args.since, until=args.until)
    if args.event_id is None and not args.dead:
        return fail("give --event-id ID, --dead, or --endpoint N --since T")
    return _replay_dead(args.event_id, endpoint=args.endpoint)


def _replay_dead(event_id: str | None, *, endpoint: str | None) -> int:
    """Put the dead deliveries of one event (`--event-id`) or every dead delivery (`--dead`),
    to one endpoint or all, back in line."""
    wanted: uuid.UUID | None = None
    if event_id is not None:
        try:
            wanted = uuid.UUID(event_id)
        except ValueError:
            return fail(f"--event-id {event_id!r} is not a UUID")

    async def replay(conn: asyncpg.Connection) -> deliveries.DeadReplay:
        return await deliveries.replay_dead(conn, event_id=wanted, endpoint=endpoint)

    done = _run(replay)
    _warn_superseded(done.superseded)
    if wanted is not None and not done.replayed:
        standing = [f"{s.endpoint} {s.status}" for s in done.standing]
        if not done.event_found:
            standing = ["no such event"]
        why = ", ".join(standing) or (
            f"it has no delivery to {endpoint}" if endpoint else "it has no delivery"
        )
        return fail(f"event {wanted} was not replayed: no DEAD delivery ({why})", 1)
    to = sorted({r.endpoint for r in done.replayed})
    print(
        printable(
            f"replayed {len(done.replayed)} delivery(ies)" + (f" to {', '.join(to)}" if to else "")
        )
    )
    return 0


def _warn_superseded(superseded: list[deliveries.Superseded]) -> None:
    """Say which dead deliveries are older than what their endpoint already got (they are
    replayed anyway: a receiver that honours `sequence` keeps the newer state)."""
    for s in superseded:
        delivered = ", ".join(
            f"{later.event_id} ({later.event_type}, sequence {later.sequence or '?'})"
            for later in s.delivered
        )
        print(
            printable(
                f"{PROGRAM}: warning: event {s.event_id} (payment {s.payment_id}, sequence "
                f"{s.sequence or '?'}) is older than event(s) of that payment already delivered "
                f"to {s.endpoint}: {delivered}. It is replayed anyway; receivers that "
                "honour `sequence` keep the newer state."
            ),
            file=sys.stderr,
        )


def parse_time(text: str, option: str) -> datetime:
    """An ISO 8601 time with an offset (`Z` allowed), in UTC; ValueError naming `option`
    otherwise (also for a time outside years 1-9999 once in UTC, which no event can have)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{option} {text!r} is not an ISO 8601 time (years 1-9999, e.g. "
            "2025-01-31T09:00:00+05:30)"
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{option} {text!r} has no offset: add one, e.g. +00:00 or Z")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{option} {text!r} is out of range (years 1-9999 in UTC)") from None


def _replay_range(endpoint: str, *, since: str, until: str | None) -> int:
    """`replay --endpoint N --since T [--until T]`: see payment_service.deliveries.REPLAY_RANGE."""
    try:
        start = parse_time(since, "--since")
        end = None if until is None else parse_time(until, "--until")
    except ValueError as error:
        return fail(str(error))
    if end is not None and end <= start:
        return fail("--until must be later than --since")

    async def replay(conn: asyncpg.Connection) -> deliveries.RangeReplay:
        return await deliveries.replay_range(conn, endpoint=endpoint, since=start, until=end)

    done = _run(replay)
    print(
        printable(
            f"{endpoint}: {done.added + done.again} event(s) in line again "
            f"({done.added} it never had, {done.again} sent or tried before)"
        )
    )
    if done.state != "ACTIVE":
        print(
            printable(
                f"{PROGRAM}: note: {endpoint} is {done.state}; they wait until "
                f"`{PROGRAM} endpoints {'enable' if done.state == 'DISABLED' else 'resume'} "
                f"{endpoint}`"
            ),
            file=sys.stderr,
        )
    return 0


def _guarded(command: Handler) -> Handler:
    """An unknown endpoint: one line on stderr, exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except EndpointNotFound as error:
            return fail(str(error))

    return run


# -- parser ---------------------------------------------------------------------------------------
def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `outbox` and its actions to the `payment-service` parser."""
    outbox = commands.add_parser(
        "outbox", help="Operate the outbox.", description="Operate the outbox."
    )
    actions = outbox.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)

    def action(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        return add_action(actions, name, _guarded(handler), help_text)

    stats = action(
        "stats",
        cmd_stats,
        "Deliveries per endpoint: pending (in flight, due, retrying), delivered, dead, the "
        "oldest pending age, breaker and state.",
    )
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    dead = action("dead", cmd_dead, "List dead deliveries, newest first.")
    dead.add_argument("--endpoint", metavar="N", help="only those to endpoint N")
    dead.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    replay = action(
        "replay",
        cmd_replay,
        "Put dead deliveries back in line (--event-id ID | --dead, optionally for one "
        "--endpoint), or send endpoint N every event of its types created in a time range again "
        "(--endpoint N --since T [--until T]), received ones and ones it never had included.",
    )
    which = replay.add_mutually_exclusive_group()
    which.add_argument("--event-id", help="the event_id (uuid) of one event with dead deliveries")
    which.add_argument("--dead", action="store_true", help="every dead delivery")
    replay.add_argument("--endpoint", metavar="N", help="only deliveries to endpoint N")
    replay.add_argument(
        "--since",
        metavar="T",
        help="ISO 8601 time with an offset (e.g. 2025-01-31T09:00:00+05:30): events created at "
        "or after it",
    )
    replay.add_argument(
        "--until", metavar="T", help="ISO 8601 time with an offset: events created before it"
    )
