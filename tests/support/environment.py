"""The environments the tests give to the processes they start.

Two kinds, both free of anything the developer's shell or .env could add to the service's settings:
- `clean_env(**variables)`: this process's environment without any of the service's
  variables, plus `variables` (names upper-cased, values as text);
- `minimal_environment(**variables)`: nothing inherited but a plain PATH and locale.
Both say GATEWAY=none unless `variables` name a GATEWAY: a process charges at a payment gateway
only in the tests that ask for one.
`relay_env` is the minimal one with what a relay test needs: this test database, the test receiver,
the tests' signing secret and short timings.
"""

from __future__ import annotations

import base64
import os

from payment_service.config import Settings

# A signing secret for tests only (Standard Webhooks format).
SECRET = "whsec_" + base64.b64encode(b"relay-tests-only-signing-key-32b").decode()
CALLBACK_PATH = "/notifications"

# Every variable the service reads; none may leak in from the shell running the tests.
CONFIG_VARIABLES = {name.upper() for name in Settings.model_fields} | {"MIGRATIONS_DIR"}


def new_signing_secret() -> str:
    """A fresh random signing secret (Standard Webhooks format)."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def _as_variables(variables: dict[str, object]) -> dict[str, str]:
    return {"GATEWAY": "none"} | {name.upper(): str(value) for name, value in variables.items()}


def clean_env(**variables: object) -> dict[str, str]:
    """This environment without any of the service's variables, plus `variables`."""
    env = {
        name: value for name, value in os.environ.items() if name.upper() not in CONFIG_VARIABLES
    }
    env.update(_as_variables(variables))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def minimal_environment(**variables: object) -> dict[str, str]:
    """Only a plain PATH and locale are inherited, plus `variables`."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    env.update(_as_variables(variables))
    return env


def relay_env(database_url: str, receiver_url: str, **overrides: object) -> dict[str, str]:
    """A relay process's environment: this database, this receiver, short timings."""
    env = minimal_environment(
        path=os.environ.get("PATH", "/usr/bin:/bin"),
        home=os.environ.get("HOME", "/tmp"),
        environment="test",
        log_level="INFO",
        database_url=database_url,
        notification_service_url=receiver_url,
        notification_callback_path=CALLBACK_PATH,
        callback_signing_secret=SECRET,
        relay_metrics_port=0,
        relay_metrics_host="127.0.0.1",
        relay_poll_interval=0.2,
        relay_request_timeout=2,
        relay_retry_schedule=0.2,
        relay_quick_retries=1,
        relay_quick_retry_wait=0.02,
        relay_shutdown_grace_seconds=5,
        relay_housekeeping_interval=3600,
    )
    env.update(_as_variables(overrides))
    return env
