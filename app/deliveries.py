"""SQL the admin API reads about the deliveries table (its writes are the fan-out in
app.payments.PAYMENT_EVENT and the relay's): one event's deliveries, for
`GET /admin/events/{event_id}/deliveries`. The document is built in SQL and sent as is.
"""

from __future__ import annotations

import uuid

import asyncpg


async def select_event_deliveries(conn: asyncpg.Connection, *, event_id: uuid.UUID) -> str | None:
    """An event (by its `event_id`, the callbacks' `webhook-id`) with its delivery to every
    endpoint, by endpoint name: state, attempts and the log of every attempt (time, outcome,
    status code, error, duration) as the relay recorded it, and whether the endpoint has since
    been removed (its delivered deliveries stay as history). None when no such event exists."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        """
        SELECT jsonb_build_object(
                   'event_id',   e.event_id,
                   'event_type', e.event_type,
                   'payment_id', e.aggregate_id,
                   'created_at', e.created_at,
                   'deliveries', coalesce(
                       (SELECT jsonb_agg(jsonb_build_object(
                                   'endpoint',         coalesce(n.name, d.removed_endpoint),
                                   'endpoint_removed', d.endpoint_id IS NULL,
                                   'status',           d.status,
                                   'attempts',         d.attempts,
                                   'counted_attempts', d.counted_attempts,
                                   'next_attempt_at',  CASE WHEN d.status = 'PENDING'
                                                            THEN d.next_attempt_at END,
                                   'last_status_code', d.last_status_code,
                                   'last_error',       d.last_error,
                                   'last_attempt_at',  d.last_attempt_at,
                                   'delivered_at',     d.delivered_at,
                                   'attempt_log',      d.attempt_log)
                                 ORDER BY coalesce(n.name, d.removed_endpoint),
                                          d.endpoint_id NULLS FIRST)
                          FROM deliveries AS d
                          LEFT JOIN endpoints AS n ON n.endpoint_id = d.endpoint_id
                         WHERE d.event_id = e.id),
                       '[]'::jsonb))
          FROM outbox_events AS e
         WHERE e.event_id = $1
        """,
        event_id,
    )
