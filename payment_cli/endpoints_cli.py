"""`payment-service endpoints …`: manage the subscribed endpoints from a terminal.

Thin commands over payment_service.endpoints, which holds the SQL and the validation: each command
parses its arguments, runs one function on one connection and prints the outcome. A secret is
printed only by `add` and `rotate-secret`. Unknown endpoints and bad input exit 2 with one line
on stderr; running API and relay processes see every change within a second or two (NOTIFY).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from payment_service import endpoints
from payment_service.config import Settings
from payment_service.database import run_with_connection
from payment_service.entry import PROGRAM
from payment_service.entry import database_settings as _database_settings

# How many undelivered deliveries go with an endpoint that `remove` deletes.
UNDELIVERED_SQL = """
SELECT count(*)
  FROM deliveries AS d
  JOIN endpoints AS n ON n.endpoint_id = d.endpoint_id
 WHERE n.name = $1
   AND d.status <> 'DELIVERED'
"""

Action = Callable[[asyncpg.Connection], Awaitable[Any]]


def _fail(message: str) -> int:
    print(f"{PROGRAM}: {message}", file=sys.stderr)
    return 2


def _run(settings: Settings, action: Action) -> Any:
    return run_with_connection(settings.dsn(), action)


def _event_types(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(text.split(","))


def _describe(endpoint: endpoints.Endpoint) -> str:
    state = endpoint.state + (f" ({endpoint.state_reason})" if endpoint.state_reason else "")
    types = ",".join(endpoint.event_types)
    url = endpoint.url or "(no URL yet)"
    return f"{endpoint.name}: {url}  events {types}  {state}  breaker {endpoint.breaker}"


# -- commands -------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    found: list[endpoints.Endpoint] = _run(_database_settings(), endpoints.select_endpoints)
    if args.json:
        print(json.dumps([endpoint.public() for endpoint in found], indent=2))
        return 0
    if not found:
        print("no endpoints")
    for endpoint in found:
        print(_describe(endpoint))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    types = _event_types(args.events) or ("*",)

    async def add(conn: asyncpg.Connection) -> endpoints.Endpoint:
        return await endpoints.insert_endpoint(
            conn, name=args.name, url=args.url, event_types=types, secret=args.secret
        )

    endpoint: endpoints.Endpoint = _run(_database_settings(), add)
    print(f"added {_describe(endpoint)}")
    print(f"signing secret (shown only now; give it to the receiver): {endpoint.secret}")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    if args.url is None and args.events is None:
        return _fail("endpoints update: give --url and/or --events")

    async def update(conn: asyncpg.Connection) -> endpoints.Endpoint:
        return await endpoints.update_endpoint(
            conn, args.name, url=args.url, event_types=_event_types(args.events)
        )

    print(f"updated {_describe(_run(_database_settings(), update))}")
    return 0


def _state_command(
    state: str, verb: str, refuse_from: str | None = None
) -> Callable[[argparse.Namespace], int]:
    """A command that sets an endpoint's state (`refuse_from`: a state it does not leave)."""

    def command(args: argparse.Namespace) -> int:
        async def change(conn: asyncpg.Connection) -> endpoints.Endpoint:
            if refuse_from is not None:
                current = await endpoints.select_endpoint(conn, args.name)
                if current.state == refuse_from:
                    raise endpoints.EndpointError(
                        f"endpoint {args.name!r} is {refuse_from}"
                        f" ({current.state_reason or 'no reason given'}): "
                        f"`{PROGRAM} endpoints enable {args.name}` turns it back on"
                    )
            return await endpoints.set_state(
                conn, args.name, state, reason=getattr(args, "reason", None)
            )

        print(f"{verb} {_describe(_run(_database_settings(), change))}")
        return 0

    return command


cmd_pause = _state_command("PAUSED", "paused")
cmd_resume = _state_command("ACTIVE", "resumed", refuse_from="DISABLED")
cmd_enable = _state_command("ACTIVE", "enabled")
cmd_disable = _state_command("DISABLED", "disabled")


def cmd_rotate_secret(args: argparse.Namespace) -> int:
    async def rotate(conn: asyncpg.Connection) -> endpoints.Endpoint:
        return await endpoints.rotate_secret(conn, args.name, secret=args.secret)

    endpoint: endpoints.Endpoint = _run(_database_settings(), rotate)
    print(f"new signing secret of {endpoint.name} (shown only now): {endpoint.secret}")
    for retired in endpoint.still_signing():
        print(f"a previous secret signs callbacks too until {retired.expires_at.isoformat()}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    settings = _database_settings()

    async def undelivered(conn: asyncpg.Connection) -> int:
        await endpoints.select_endpoint(conn, args.name)  # raises EndpointNotFound
        return int(await conn.fetchval(UNDELIVERED_SQL, args.name))

    if not args.yes:
        waiting: int = _run(settings, undelivered)
        return _fail(
            f"endpoints remove: {args.name} has {waiting} undelivered deliveries, which would be "
            "deleted with it; run again with --yes to remove it"
        )

    async def remove(conn: asyncpg.Connection) -> int:
        return await endpoints.delete_endpoint(conn, args.name)

    gone: int = _run(settings, remove)
    print(f"removed endpoint {args.name} and its {gone} undelivered deliveries")
    return 0


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input and unknown endpoints: one line on stderr, exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except endpoints.EndpointError as error:
            return _fail(str(error))
        except asyncpg.IntegrityConstraintViolationError as error:  # a CHECK of the table
            return _fail(f"refused by the database: {error}")

    return run


# -- parser ---------------------------------------------------------------------------------------
def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `endpoints` and its actions to the `payment-service` parser."""
    group = commands.add_parser(
        "endpoints",
        help="Manage subscribed endpoints (downstream services).",
        description=(
            "Manage subscribed endpoints: each gets every event of its types, signed with its "
            "own secret, in order per payment, retried on its own."
        ),
    )
    actions = group.add_subparsers(dest="endpoints_command", metavar="ACTION", required=True)

    def action(
        name: str, handler: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=_guarded(handler))
        return sub

    def named(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("name", help="the endpoint's name")
        return sub

    events_help = (
        f"comma-separated event types ({', '.join(endpoints.EVENT_TYPES)}), prefixes such as "
        "'payment.*', or '*'"
    )
    listing = action("list", cmd_list, "List endpoints: URL, event types, state, breaker.")
    listing.add_argument("--json", action="store_true", help="a JSON array (no secrets)")

    add = action(
        "add",
        cmd_add,
        "Add an endpoint; it receives events written from now on. Prints its secret.",
    )
    add.add_argument("--name", required=True, help="1-63 lower-case letters, digits, '_', '-'")
    add.add_argument("--url", required=True, help="the callback URL, http(s)://host[:port]/path")
    add.add_argument("--events", metavar="T,T", help=events_help + " (default '*')")
    add.add_argument("--secret", help="its signing secret, whsec_… (default: a new one)")

    update = named(action("update", cmd_update, "Change an endpoint's URL and/or event types."))
    update.add_argument("--url", help="the new callback URL")
    update.add_argument("--events", metavar="T,T", help=events_help)

    pause = named(action("pause", cmd_pause, "Pause an endpoint: its deliveries wait."))
    pause.add_argument("--reason", help="why (shown by list)")
    named(action("resume", cmd_resume, "Resume a paused endpoint: its deliveries go, in order."))
    named(
        action(
            "enable",
            cmd_enable,
            "Enable a DISABLED endpoint (or any): breaker closed, kept deliveries go, in order.",
        )
    )
    disable = named(
        action("disable", cmd_disable, "Disable an endpoint: its deliveries are kept, unsent.")
    )
    disable.add_argument("--reason", help="why (shown by list)")

    rotate = named(
        action(
            "rotate-secret",
            cmd_rotate_secret,
            "Give an endpoint a new signing secret (printed); the secrets it replaced in the last "
            "24 h sign too (three at most).",
        )
    )
    rotate.add_argument("--secret", help="the new secret, whsec_… (default: a new one)")

    remove = named(
        action("remove", cmd_remove, "Delete an endpoint and its undelivered deliveries.")
    )
    remove.add_argument("--yes", action="store_true", help="really delete (required)")
