"""The last reconciliation with the gateway, as the console's overview shows it.

Reconciliation (`gateway_reconciliations`) may not exist on this database yet: `last_reconciliation`
then answers None, as it does before the first run, and the overview says `never run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

EXISTS = "SELECT to_regclass('gateway_reconciliations') IS NOT NULL"
# The latest finished run (by its id, the primary key read backwards).
LAST = """
SELECT started_at, finished_at, since, until, differences
  FROM gateway_reconciliations
 WHERE finished_at IS NOT NULL
 ORDER BY id DESC
 LIMIT 1
"""


@dataclass(frozen=True)
class Reconciliation:
    started_at: datetime
    finished_at: datetime
    since: datetime | None
    until: datetime | None
    differences: int


async def last_reconciliation(conn: asyncpg.Connection) -> Reconciliation | None:
    """The latest finished reconciliation; None when none ran (or the table does not exist)."""
    if not await conn.fetchval(EXISTS):
        return None
    row = await conn.fetchrow(LAST)
    return None if row is None else Reconciliation(**dict(row))
