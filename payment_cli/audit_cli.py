"""`payment-service audit`: the audit log of operator actions, newest first.

A thin command over payment_service.audit: it parses the filters, reads the log page by page up to
`--limit` entries, and prints one line per entry (every value escaped with `printable`: a reason
or an endpoint's URL cannot drive the terminal), or a JSON array with `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import asyncpg

from payment_cli.outbox_cli import parse_time
from payment_service import audit
from payment_service.database import run_with_connection
from payment_service.entry import PROGRAM, printable
from payment_service.entry import database_settings as _database_settings

DEFAULT_LIMIT = 50


def _fail(message: str) -> int:
    print(f"{PROGRAM}: {printable(message)}", file=sys.stderr)
    return 2


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def describe(entry: audit.AuditEntry) -> str:
    """One line: when, who, what, on what, from where, the changed fields, the reason."""
    if entry.before is None:
        fields = [f"{key} {_value(new)}" for key, _, new in entry.changed()]
    elif entry.after is None:
        fields = [f"{key} was {_value(old)}" for key, old, _ in entry.changed()]
    else:
        fields = [f"{key} {_value(old)} → {_value(new)}" for key, old, new in entry.changed()]
    parts = [
        entry.at.isoformat(),
        entry.actor,
        entry.action,
        str(entry.target),
        f"from {entry.origin}",
        "; ".join(fields) or "no change",
    ]
    if entry.reason:
        parts.append(f"reason: {entry.reason}")
    return printable("  ".join(parts))


def cmd_audit(args: argparse.Namespace) -> int:
    if args.limit < 1:
        return _fail("--limit must be at least 1")
    try:
        since = None if args.since is None else parse_time(args.since, "--since")
        until = None if args.until is None else parse_time(args.until, "--until")
    except ValueError as error:
        return _fail(str(error))

    async def read(conn: asyncpg.Connection) -> list[audit.AuditEntry]:
        found: list[audit.AuditEntry] = []
        before_id = None
        while len(found) < args.limit:
            page = await audit.select_audit(
                conn,
                since=since,
                until=until,
                actor=args.actor,
                action=args.action,
                target=args.target,
                limit=min(audit.MAX_PAGE, args.limit - len(found)),
                before_id=before_id,
            )
            found += page.entries
            if not page.has_more:
                break
            before_id = page.entries[-1].audit_id
        return found

    entries = run_with_connection(_database_settings().dsn(), read)
    if args.json:
        print(json.dumps([entry.public() for entry in entries], ensure_ascii=False))
        return 0
    if not entries:
        print("no audit entries")
    for entry in entries:
        print(describe(entry))
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `audit` to the `payment-service` parser."""
    help_text = (
        "The audit log of operator actions (endpoint changes, secret rotations, replays, manual "
        "settlements, …) from the command line, the admin API and the console, newest first."
    )
    sub = commands.add_parser("audit", help=help_text, description=help_text)
    sub.set_defaults(handler=cmd_audit)
    sub.add_argument(
        "--since", metavar="T", help="ISO 8601 time with an offset (2025-01-31T09:00:00+05:30)"
    )
    sub.add_argument("--until", metavar="T", help="ISO 8601 time with an offset: before it")
    sub.add_argument("--actor", metavar="A", help="who: admin:NAME, console:NAME or cli:USER")
    sub.add_argument(
        "--action", metavar="X", help="what: endpoint.pause, …, or endpoint.* for all of a kind"
    )
    sub.add_argument("--target", metavar="T", help="on what: endpoint:trip, or trip alone")
    sub.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"at most this many (default {DEFAULT_LIMIT})",
    )
    sub.add_argument("--json", action="store_true", help="a JSON array of the entries")
