"""What the `payment-service` command modules share: a subcommand bound to its handler, and the
one line on stderr that a refused command prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from payment_service.entry import PROGRAM, printable

Handler = Callable[[argparse.Namespace], int]


def add_action(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Handler,
    help_text: str,
) -> argparse.ArgumentParser:
    """A subcommand of `group` that runs `handler`, its help text also its description."""
    sub = group.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    return sub


def fail(message: str, code: int = 2) -> int:
    """Print `message` (escaped: it may quote input or the database) as the command's one line
    on stderr, and return the exit code `code`."""
    print(f"{PROGRAM}: {printable(message)}", file=sys.stderr)
    return code
