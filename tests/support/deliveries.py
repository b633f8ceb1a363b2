"""Deliveries written the way the API's fan-out writes them, for tests that arrange
rows by SQL: one per (event, endpoint) for every ACTIVE or PAUSED endpoint whose types match."""

from __future__ import annotations

import asyncpg

# $1: the payments whose events get their deliveries (NULL: every event). Existing ones stay.
FAN_OUT_SQL = """
INSERT INTO deliveries (event_id, endpoint_id, aggregate_id, created_at)
SELECT e.id, n.endpoint_id, e.aggregate_id, e.created_at
  FROM outbox_events AS e
  JOIN endpoints AS n
    ON endpoint_wants(n.event_types, e.event_type)
   AND n.state IN ('ACTIVE', 'PAUSED')
 WHERE $1::bigint[] IS NULL OR e.aggregate_id = ANY ($1)
 ORDER BY e.id, n.endpoint_id
    ON CONFLICT (event_id, endpoint_id) DO NOTHING
"""


async def fan_out(conn: asyncpg.Connection, payment_ids: list[int] | None = None) -> int:
    """Write the missing deliveries of these payments' events (all events when None)."""
    result = await conn.execute(FAN_OUT_SQL, payment_ids)
    return int(result.split()[-1])
