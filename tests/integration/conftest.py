"""Fixtures for the API tests: the real app served by Hypercorn on 127.0.0.1 against this test's
migrated database (`database_url` from tests/conftest.py).

- `api_factory(**overrides)` (tests/support/api.py, for every test) starts a server with
  Settings overrides (lower-case field names:
  `api_keys=("k1",)`, `api_prefix="/v1"`, `idempotency_key_ttl=1`, ...) and returns a
  `RunningApi` (`.client` is an `httpx.AsyncClient` on its base URL); every server it started is
  shut down cleanly at the end of the test.
- `api` is one server with the defaults of `support.BASE_OVERRIDES` (UPI settles asynchronously);
  `client` is its HTTP client.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.api import ApiFactory, RunningApi

__all__ = ["ApiFactory"]  # tests import it from here


@pytest.fixture
async def api(api_factory: ApiFactory) -> RunningApi:
    return await api_factory()


@pytest.fixture
def client(api: RunningApi) -> httpx.AsyncClient:
    return api.client
