"""The `payment-service` command: one entry point for every process the service runs.

Each subcommand imports what it needs when it runs, so `--help` is instant and the relay's
commands never load the HTTP stack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from outbox_relay import RELAY_DESCRIPTION
from payment_cli.endpoints_cli import add_parser as add_endpoints_parser
from payment_service import __version__
from payment_service.entry import database_settings as _database_settings
from payment_service.entry import run_command
from payment_service.entry import settings_with_logging as _settings


# -- commands ------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from payment_cli.supervisor import run_all

    return run_all(_settings(), with_relay=not args.no_relay)


def cmd_serve(args: argparse.Namespace) -> int:
    from app.server import serve
    from payment_service.gateway.factory import check_gateway_settings

    settings = _database_settings()
    check_gateway_settings(settings)  # before any worker starts: one line, not a traceback
    return serve(settings, host=args.host, port=args.port, workers=args.workers, server=args.server)


def cmd_relay(args: argparse.Namespace) -> int:
    from outbox_relay.main import run_relay

    return run_relay(_database_settings())


def cmd_migrate(args: argparse.Namespace) -> int:
    from payment_cli.supervisor import prepare_database

    settings = _database_settings()
    prepared = prepare_database(settings.dsn(), settings, wait=args.wait)
    for line in prepared.describe():
        print(line)
    for line in prepared.warnings():
        print(f"payment-service: {line}", file=sys.stderr)
    return 0


def cmd_outbox_stats(args: argparse.Namespace) -> int:
    from outbox_relay.admin import outbox_stats

    return outbox_stats(_database_settings(), as_json=args.json)


def cmd_outbox_dead(args: argparse.Namespace) -> int:
    from outbox_relay.admin import outbox_dead

    return outbox_dead(
        _database_settings(), limit=args.limit, as_json=args.json, endpoint=args.endpoint
    )


def cmd_outbox_replay(args: argparse.Namespace) -> int:
    from outbox_relay.admin import outbox_replay, outbox_replay_range

    if args.since is not None or args.until is not None:
        if args.event_id is not None or args.dead:
            print("payment-service: --since/--until replace --event-id and --dead", file=sys.stderr)
            return 2
        if args.endpoint is None or args.since is None:
            print("payment-service: a range replay needs --endpoint N --since T", file=sys.stderr)
            return 2
        return outbox_replay_range(
            _database_settings(), endpoint=args.endpoint, since=args.since, until=args.until
        )
    if args.event_id is None and not args.dead:
        print(
            "payment-service: give --event-id ID, --dead, or --endpoint N --since T",
            file=sys.stderr,
        )
        return 2
    return outbox_replay(
        _database_settings(), event_id=args.event_id, dead=args.dead, endpoint=args.endpoint
    )


def cmd_notification_sink(args: argparse.Namespace) -> int:
    from payment_cli.sink import run_sink

    settings = _settings()
    return run_sink(settings, args)


def cmd_gateway_review(args: argparse.Namespace) -> int:
    from payment_cli.gateway_cli import gateway_review

    return gateway_review(_database_settings(), as_json=args.json)


def cmd_check(args: argparse.Namespace) -> int:
    from payment_cli.check import run_check

    return run_check(_database_settings(), as_json=args.json)


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="payment-service",
        description=(
            "Payments, refunds and the transactional outbox of the ride-hailing platform. "
            "Configuration comes from environment variables (and .env); see .env.example."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        help_text: str,
        parent: argparse._SubParsersAction[argparse.ArgumentParser] = commands,
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    run = add(
        "run",
        cmd_run,
        "Run everything locally: an embedded PostgreSQL under PAYMENT_SERVICE_DATA_DIR when no "
        "database is configured, migrations, then the API and the relay as supervised processes. "
        "Ctrl-C stops all.",
    )
    run.add_argument("--no-relay", action="store_true", help="start the API only")

    serve = add("serve", cmd_serve, "Serve the HTTP API (Uvicorn by default, or Hypercorn).")
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")  # noqa: S104
    serve.add_argument("--port", type=int, help="port (default SERVICE_PORT, 8082)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument(
        "--server",
        choices=("hypercorn", "uvicorn"),
        default="uvicorn",
        help="ASGI server (default uvicorn: the faster one measured, see the README; hypercorn "
        "is supported and tested as well)",
    )

    add("relay", cmd_relay, RELAY_DESCRIPTION)

    migrate = add(
        "migrate",
        cmd_migrate,
        "Apply pending migrations under an advisory lock (safe from many replicas at once), then "
        "seed the endpoints from the settings (warnings on stderr).",
    )
    migrate.add_argument(
        "--wait", type=float, default=60, help="seconds to wait for the database (default 60)"
    )

    outbox = commands.add_parser(
        "outbox", help="Operate the outbox.", description="Operate the outbox."
    )
    outbox_commands = outbox.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)
    stats = add(
        "stats",
        cmd_outbox_stats,
        "Deliveries per endpoint: pending (in flight, due, retrying), delivered, dead, the "
        "oldest pending age, breaker and state.",
        outbox_commands,
    )
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    dead = add("dead", cmd_outbox_dead, "List dead deliveries, newest first.", outbox_commands)
    dead.add_argument("--endpoint", metavar="N", help="only those to endpoint N")
    dead.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    replay = add(
        "replay",
        cmd_outbox_replay,
        "Put dead deliveries back in line (--event-id ID | --dead, optionally for one "
        "--endpoint), or send endpoint N every event of its types created in a time range again "
        "(--endpoint N --since T [--until T]), received ones and ones it never had included.",
        outbox_commands,
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

    sink = add(
        "notification-sink",
        cmd_notification_sink,
        "A stand-in Notification Service: receives callbacks, verifies signatures, prints events.",
    )
    sink.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sink.add_argument("--port", type=int, default=8085, help="port (default 8085)")
    sink.add_argument(
        "--name",
        default="notification",
        help="the service it stands in for, printed with each event (default notification); "
        "several sinks run at once on other ports",
    )
    sink.add_argument(
        "--path",
        help="the callback path (default: that service's *_CALLBACK_PATH, else "
        "NOTIFICATION_CALLBACK_PATH)",
    )
    sink.add_argument(
        "--fail-first",
        type=int,
        default=0,
        metavar="N",
        help="answer the first N callbacks with --status (default 500)",
    )
    sink.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="answer this fraction of callbacks (0-1) with --status (default 500)",
    )
    sink.add_argument(
        "--status",
        type=int,
        metavar="CODE",
        help="the error status to answer; alone, every callback gets it (e.g. 410)",
    )
    sink.add_argument(
        "--delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long before answering (to watch timeouts)",
    )

    add_endpoints_parser(commands)

    gateway = commands.add_parser(
        "gateway",
        help="The payment gateway's operations.",
        description="The payment gateway's operations.",
    )
    gateway_commands = gateway.add_subparsers(
        dest="gateway_command", metavar="ACTION", required=True
    )
    review = add(
        "review",
        cmd_gateway_review,
        "Charges and refunds whose outcome at the gateway stayed unknown after "
        "GATEWAY_MAX_CHECKS checks (flagged for review), with what the gateway says about each "
        "now. Decide a payment with POST /admin/payments/{id}/settlement.",
        gateway_commands,
    )
    review.add_argument("--json", action="store_true", help="machine-readable output")

    check = add(
        "check",
        cmd_check,
        "Check the database's consistency: events, their deliveries, idempotency records and "
        "refund sums.",
    )
    check.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
