"""A removed endpoint's delivered deliveries stay as history (`endpoint_id` NULL, its name in
`removed_endpoint`) until housekeeping deletes them with the rest; the schema keeps that history
honest whatever writes it. A real PostgreSQL."""

from __future__ import annotations

import asyncpg
import pytest

from outbox_relay.housekeeping import housekeep
from payment_service import endpoints
from tests.support.database import insert_events


async def remove_trip_with_history(conn: asyncpg.Connection) -> list[int]:
    """Endpoint `trip` with 3 events, 2 delivered, then removed; the kept deliveries' ids."""
    await endpoints.insert_endpoint(conn, name="trip", url="http://127.0.0.1:9/t")
    events = await insert_events(conn, payments=3)
    await conn.execute(
        "UPDATE deliveries SET status = 'DELIVERED', attempts = 1, delivered_at = now()"
        " WHERE endpoint_id = (SELECT endpoint_id FROM endpoints WHERE name = 'trip')"
        "   AND event_id = ANY($1)",
        [e.id for e in events[:2]],
    )
    assert await endpoints.delete_endpoint(conn, "trip") == endpoints.Removed(1, 2)
    return [
        r[0]
        for r in await conn.fetch("SELECT delivery_id FROM deliveries WHERE endpoint_id IS NULL")
    ]


async def test_housekeeping_deletes_the_history_after_retention(conn: asyncpg.Connection) -> None:
    kept = await remove_trip_with_history(conn)
    assert len(kept) == 2
    done = await housekeep(conn, retention_hours=1)
    assert done.deliveries_deleted == 0, "within retention the history stays"
    await conn.execute(
        "UPDATE deliveries SET delivered_at = now() - interval '2 hours' WHERE endpoint_id IS NULL"
    )
    done = await housekeep(conn, retention_hours=1)
    assert done.deliveries_deleted == 2
    assert await conn.fetchval("SELECT count(*) FROM deliveries WHERE endpoint_id IS NULL") == 0


@pytest.mark.parametrize(
    ("assignments", "why"),
    [
        ("status = 'PENDING', delivered_at = NULL", "only delivered deliveries are history"),
        ("removed_endpoint = NULL", "history keeps its endpoint's name"),
        ("endpoint_id = (SELECT endpoint_id FROM endpoints WHERE name = 'notification')",
         "a delivery of a live endpoint carries no removed name"),
    ],
)  # fmt: skip
async def test_the_schema_keeps_the_history_honest(
    conn: asyncpg.Connection, assignments: str, why: str
) -> None:
    kept = await remove_trip_with_history(conn)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute(f"UPDATE deliveries SET {assignments} WHERE delivery_id = $1", kept[0])
