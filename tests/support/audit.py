"""The audit log in the tests: the operator that tests' own changes are made as, and the rows read
back (payment_service.audit)."""

from __future__ import annotations

from typing import Any

import asyncpg

from payment_service.audit import Operator

# Who the tests' direct calls of the core functions act as (never one a real caller has).
OPERATOR = Operator("test:tests", "tests")
# The actions of the tests that add an endpoint, change it every way there is, then remove it.
EVERY_ENDPOINT_ACTION = [
    "endpoint.add",
    "endpoint.update",
    "endpoint.pause",
    "endpoint.resume",
    "endpoint.disable",
    "endpoint.enable",
    "endpoint.rotate_secret",
    "endpoint.rotate_secret",
    "endpoint.remove",
]


async def audit_rows(conn: asyncpg.Connection, **where: str) -> list[dict[str, Any]]:
    """The audit log's rows, oldest first, as dicts with `before`/`after` as text (JSON); `where`
    keeps those whose columns equal the values given (`action="endpoint.add"`)."""
    clauses = [f"{column} = ${n}" for n, column in enumerate(where, start=1)]
    rows = await conn.fetch(
        "SELECT audit_id, at, actor, action, target_kind, target_id, origin, reason,"
        " before::text AS before, after::text AS after FROM audit_log"
        + (" WHERE " + " AND ".join(clauses) if clauses else "")
        + " ORDER BY audit_id",
        *where.values(),
    )
    return [dict(row) for row in rows]


async def audit_text(conn: asyncpg.Connection) -> str:
    """Every row of the audit log as text, to search for what must never be there (a secret)."""
    text: str = await conn.fetchval(
        "SELECT coalesce(string_agg(a::text, E'\\n' ORDER BY audit_id), '') FROM audit_log AS a"
    )
    return text
