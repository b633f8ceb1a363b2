"""What every command does around its body: settings, logging, and errors a user can act on.

Shared by the `payment-service` command line (payment_cli) and `python -m outbox_relay`, so both
fail the same way: one line on stderr naming the problem, and an exit code.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

from payment_service.config import ConfigurationError, Settings, load_settings
from payment_service.database import UNAVAILABLE_ERRORS
from payment_service.logs import configure_logging
from payment_service.migrations import MigrationError

PROGRAM = "payment-service"

# What a terminal would act on rather than show: C0 and C1 controls (escape sequences, carriage
# returns, bells), DEL, and the line and bidirectional-text controls that can reorder or hide
# what follows them.
_TERMINAL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """`text` as a command prints it: every terminal control escaped (`\x1b`, `\n`, `\u202e`),
    so that a value from outside (a receiver's answer, a URL, a name, metadata, an error) shows
    as text and cannot drive the terminal or forge a line of output."""
    return _TERMINAL_CONTROLS.sub(_escape, str(text))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or (
        f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    )


def settings_with_logging() -> Settings:
    """The settings from the environment, with logging configured at their LOG_LEVEL."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return settings


def database_settings() -> Settings:
    """As `settings_with_logging`, failing with a clear message when no database is configured."""
    settings = settings_with_logging()
    settings.dsn()
    return settings


def run_command(body: Callable[[], int]) -> int:
    """Run a command's body and return its exit code; known failures become one line."""
    try:
        return int(body())
    except (ConfigurationError, MigrationError) as error:
        print(f"{PROGRAM}: {printable(error)}", file=sys.stderr)
        return 2
    except UNAVAILABLE_ERRORS as error:
        print(f"{PROGRAM}: the database is not reachable: {printable(error)}", file=sys.stderr)
        return 1
    except OSError as error:  # a file or a port, say: not the database
        print(f"{PROGRAM}: {printable(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
