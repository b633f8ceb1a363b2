"""The `payment-service` command: one entry point for every process the service runs.

Each subcommand imports what it needs when it runs, so `--help` is instant and the relay's
commands never load the HTTP stack. A reader that goes away (`payment-service outbox dead | head
-1`) ends any command quietly, as it would a Unix tool.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from outbox_relay import RELAY_DESCRIPTION
from payment_cli.actions import Handler, add_action
from payment_cli.audit_cli import add_parser as add_audit_parser
from payment_cli.endpoints_cli import add_parser as add_endpoints_parser
from payment_cli.gateway_cli import add_parser as add_gateway_parser
from payment_cli.outbox_cli import add_parser as add_outbox_parser
from payment_cli.reconcile_cli import add_parser as add_reconcile_parser
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


def cmd_notification_sink(args: argparse.Namespace) -> int:
    from payment_cli.sink import run_sink

    settings = _settings()
    return run_sink(settings, args)


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

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        return add_action(commands, name, handler, help_text)

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

    add_outbox_parser(commands)

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
        "--secret",
        metavar="WHSEC",
        help="the endpoint's signing secret (whsec_…, as `endpoints add` printed it) to verify "
        "signatures with (default CALLBACK_SIGNING_SECRET; neither: signatures are not checked)",
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
    add_audit_parser(commands)

    add_gateway_parser(commands)
    add_reconcile_parser(commands)

    check = add(
        "check",
        cmd_check,
        "Check the database's consistency: events, their deliveries, idempotency records and "
        "refund sums.",
    )
    check.add_argument("--json", action="store_true", help="machine-readable report")
    return parser


# The exit code of a command whose output pipe closed: that of a process SIGPIPE ended (128 + 13).
CLOSED_PIPE_EXIT = 141


def _until_the_reader_goes(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command; if its output pipe closes (`| head`), stop quietly with CLOSED_PIPE_EXIT."""
    try:
        code = handler(args)
        sys.stdout.flush()  # here, not at exit, where a closed pipe would print a traceback
    except BrokenPipeError:
        # What is still buffered can never be written; point stdout at /dev/null so that the
        # interpreter's last flush has nothing to complain about.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_PIPE_EXIT
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _until_the_reader_goes(args.handler, args))


if __name__ == "__main__":
    sys.exit(main())
