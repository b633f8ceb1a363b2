"""Fixtures every test may ask for, defined in tests/support and registered here.

- `postgres_server`, `template_database`, `database_url`, `empty_database_url`, `db`, `conn`:
  the session's PostgreSQL and this test's own migrated (or empty) database
  (tests/support/database.py says where the server comes from);
- `api_factory`: the real API served on 127.0.0.1 with settings overrides (tests/support/api.py);
- `receiver`: the test receiver on 127.0.0.1 (tests/support/receiver.py);
- `relays`: relay processes against this test's database and receiver (tests/support/processes.py);
- `embedded_gateway` (session) and `ids`: a real localstripe process on 127.0.0.1 and fresh ids
  for what a test makes there (tests/support/gateway.py);
- `proxy_factory`: fault-injecting HTTP proxies on 127.0.0.1 (tests/support/fault_proxy.py);
- `browser`: the session's headless Chromium, its cookies cleared (tests/support/browser.py).
"""

from __future__ import annotations

import os

import pytest

from tests.support.api import api_factory_fixture  # noqa: F401 - fixture
from tests.support.browser import browser, browser_session  # noqa: F401 - fixtures
from tests.support.database import (  # noqa: F401 - fixtures
    announcements,
    conn_fixture,
    database_url,
    db,
    empty_database_url,
    postgres_server,
    template_database,
)
from tests.support.fault_proxy import proxy_factory_fixture  # noqa: F401 - fixture
from tests.support.gateway import embedded_gateway_fixture, ids_fixture  # noqa: F401 - fixtures
from tests.support.processes import relays_fixture  # noqa: F401 - fixture
from tests.support.receiver import receiver_fixture  # noqa: F401 - fixture


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in announcements:
        terminalreporter.write_line(line)


def pytest_report_header(config: pytest.Config) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    wanted = os.environ.get("TEST_DATABASE_PROVIDER", "auto")
    return f"test database provider: {wanted}{' (TEST_DATABASE_URL set)' if url else ''}"
