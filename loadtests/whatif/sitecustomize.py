"""What-if patches for benchmarks: measure a proposed change to the API before anyone makes it.

Never used by the service itself. Put this folder on PYTHONPATH and switch patches on with
environment variables; every process the benchmark starts (`payment-service serve`, uvicorn,
granian) then loads them at start-up:

    PYTHONPATH=loadtests/whatif WHATIF_NO_RESET=1 \
        .venv/bin/python loadtests/bench.py --only service,seed --fsync on

- WHATIF_NO_RESET: the API's asyncpg pool skips the reset query asyncpg sends on every release
  (`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`, a second round trip).
(The NOTIFY-after-commit patch that was measured here first is now the service's own
app/notifier.py.)
"""

from __future__ import annotations

import os

if os.environ.get("WHATIF_NO_RESET"):
    import payment_service.database as _database

    _create_pool = _database.create_pool

    async def _keep_session(_conn: object) -> None:
        return None

    async def _create_pool_without_reset(dsn: str, *, min_size: int, max_size: int, **kw: object):  # type: ignore[no-untyped-def]
        kw.setdefault("reset", _keep_session)
        return await _create_pool(dsn, min_size=min_size, max_size=max_size, **kw)

    _database.create_pool = _create_pool_without_reset  # type: ignore[assignment]
