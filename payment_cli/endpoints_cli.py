"""`payment-service endpoints …`: manage the subscribed endpoints from a terminal.

Thin commands over payment_service.endpoints, which holds the SQL and the validation (the same
checks the admin API makes): each command parses its arguments, runs one function on one
connection and prints the outcome, every value from the database escaped (`printable`). A secret
is printed only by `add` and `rotate-secret`. Unknown endpoints and bad input exit 2 with one line
on stderr; running API and relay processes see every change within a second or two (NOTIFY).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from payment_cli.actions import Handler, add_action, fail
from payment_service import endpoints
from payment_service.config import Settings
from payment_service.database import run_with_connection
from payment_service.entry import database_settings as _database_settings
from payment_service.entry import printable
from payment_service.vocabulary import EVENT_TYPES

Action = Callable[[asyncpg.Connection], Awaitable[Any]]


def _run(settings: Settings, action: Action) -> Any:
    return run_with_connection(settings.dsn(), action)


def _event_types(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(text.split(","))


def _describe(endpoint: endpoints.Endpoint) -> str:
    state = endpoint.state + (f" ({endpoint.state_reason})" if endpoint.state_reason else "")
    types = ",".join(endpoint.event_types)
    url = endpoint.url or "(no URL yet)"
    return printable(f"{endpoint.name}: {url}  events {types}  {state}  breaker {endpoint.breaker}")


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
    settings = _database_settings()

    async def add(conn: asyncpg.Connection) -> endpoints.Endpoint:
        return await endpoints.insert_endpoint(
            conn,
            name=args.name,
            url=args.url,
            event_types=types,
            secret=args.secret,
            networks=settings.callback_networks,
        )

    endpoint: endpoints.Endpoint = _run(settings, add)
    print(f"added {_describe(endpoint)}")
    print(f"signing secret (shown only now; give it to the receiver): {endpoint.secret}")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    if args.url is None and args.events is None:
        return fail("endpoints update: give --url and/or --events")

    settings = _database_settings()

    async def update(conn: asyncpg.Connection) -> endpoints.Endpoint:
        return await endpoints.update_endpoint(
            conn,
            args.name,
            url=args.url,
            event_types=_event_types(args.events),
            networks=settings.callback_networks,
        )

    print(f"updated {_describe(_run(settings, update))}")
    return 0


Change = Callable[[asyncpg.Connection, argparse.Namespace], Awaitable[endpoints.Endpoint]]


def _state_command(verb: str, change: Change) -> Handler:
    """A command that changes an endpoint's state and prints it."""

    def command(args: argparse.Namespace) -> int:
        async def run(conn: asyncpg.Connection) -> endpoints.Endpoint:
            return await change(conn, args)

        print(f"{verb} {_describe(_run(_database_settings(), run))}")
        return 0

    return command


cmd_pause = _state_command(
    "paused", lambda conn, args: endpoints.pause(conn, args.name, reason=args.reason)
)
cmd_resume = _state_command("resumed", lambda conn, args: endpoints.resume(conn, args.name))
cmd_disable = _state_command(
    "disabled", lambda conn, args: endpoints.disable(conn, args.name, reason=args.reason)
)


def cmd_enable(args: argparse.Namespace) -> int:
    async def enable(conn: asyncpg.Connection) -> tuple[endpoints.Endpoint, endpoints.Gap | None]:
        return await endpoints.enable(conn, args.name)

    endpoint, gap = _run(_database_settings(), enable)
    print(f"enabled {_describe(endpoint)}")
    if gap is not None:
        print(
            f"it was DISABLED from {gap.disabled_at.isoformat()} and missed "
            f"{gap.missed_events} event(s) written since (they got no delivery to it)"
        )
        if gap.missed_events:
            print(f"to send them: {gap.replay_command}")
    return 0


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
        return await endpoints.count_undelivered(conn, args.name)

    if not args.yes:
        waiting: int = _run(settings, undelivered)
        return fail(
            f"endpoints remove: {args.name} has {waiting} undelivered deliveries, which would be "
            "deleted with it (its delivered ones stay as history); run again with --yes to "
            "remove it"
        )

    async def remove(conn: asyncpg.Connection) -> endpoints.Removed:
        return await endpoints.delete_endpoint(conn, args.name)

    gone: endpoints.Removed = _run(settings, remove)
    print(
        f"removed endpoint {args.name} and its {gone.undelivered} undelivered deliveries; "
        f"its {gone.delivered} delivered ones stay as history until retention"
    )
    return 0


def _guarded(command: Handler) -> Handler:
    """Bad input and unknown endpoints: one line on stderr, exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except endpoints.EndpointError as error:
            return fail(str(error))
        except asyncpg.IntegrityConstraintViolationError as error:  # a CHECK of the table
            return fail(f"refused by the database: {error}")

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

    def action(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        return add_action(actions, name, _guarded(handler), help_text)

    def named(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("name", help="the endpoint's name")
        return sub

    events_help = (
        f"comma-separated event types ({', '.join(EVENT_TYPES)}), prefixes such as 'payment.*', "
        "or '*'"
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
            "Enable a DISABLED endpoint (or any): breaker closed, kept deliveries go, in order. "
            "Says what it missed while DISABLED and the `outbox replay` command that sends it.",
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
        action(
            "remove",
            cmd_remove,
            "Delete an endpoint and its undelivered deliveries (its delivered ones stay as "
            "history until retention).",
        )
    )
    remove.add_argument("--yes", action="store_true", help="really delete (required)")
