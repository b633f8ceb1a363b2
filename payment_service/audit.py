"""The audit log (table `audit_log`): every operator action, who did it, from where, what changed.

An `Operator` says who acts and from where: `admin:<key name>` from the admin API, `console:<key
name>` from the console, `cli:<user>` from the command line (the operating-system user running
it). The core functions that make an operator's changes (payment_service.endpoints, …) take one
and call `record` themselves, in the transaction of the change, so that no command, route or
page can change something without its row, nor record a change that was rolled back; `record`
refuses to run outside a transaction.

A row holds the action (`endpoint.pause`, …), its target (`endpoint` `trip`), the fields that
changed as they were before and after (never a secret: `record` refuses a value that looks like
one, and a secret typed into a reason is masked), and the operator's reason when one was given.
The table is append-only (its triggers refuse UPDATE, DELETE and TRUNCATE) and kept forever.

`select_audit` reads it newest first, in keyset pages of (at, audit_id), filtered by time, actor,
action and target; each filter combination is one fixed statement, so the planner uses the index
of the filter given (the tests EXPLAIN them).
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import pwd
import re
import socket
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from payment_service.signing import SECRET_PREFIX
from payment_service.sql import Statement

MAX_PAGE = 100  # entries per page, at most
MAX_REASON_LENGTH = 1000  # characters; the table's CHECK says the same
# What a signing secret looks like wherever it appears: `whsec_` and its base64.
_SECRET = re.compile(re.escape(SECRET_PREFIX) + r"[A-Za-z0-9+/=]*")
_ACTION = re.compile(r"^[a-z]+(\.[a-z_]+)+$")


class AuditError(ValueError):
    """An audit row that cannot be written as asked; the message says why."""


@dataclass(frozen=True)
class Operator:
    """Who makes a change (`actor`) and from where (`origin`), as the audit log records it."""

    actor: str
    origin: str

    @classmethod
    def admin_key(cls, name: str, address: str | None) -> Operator:
        """A caller of the admin API, by its ADMIN_API_KEYS name, from the client's address."""
        return cls(f"admin:{name}", address or "unknown")

    @classmethod
    def console(cls, name: str, address: str | None) -> Operator:
        """An operator signed in to the console with the admin key named `name`."""
        return cls(f"console:{name}", address or "unknown")

    @classmethod
    def command_line(cls) -> Operator:
        """The operating-system user running this `payment-service` command, on this host.

        The name of the process's user id, which the environment cannot change (getpass's
        LOGNAME or USER could); with `sudo`, the user who ran sudo is named too."""
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a uid without a passwd entry (a container's arbitrary uid)
            user = getpass.getuser() if os.environ.get("USER") else str(os.geteuid())
        sudo = os.environ.get("SUDO_USER")
        if sudo and sudo != user:
            user = f"{user} (sudo by {sudo})"
        return cls(f"cli:{user}", f"cli@{socket.gethostname()}")


@dataclass(frozen=True)
class Target:
    """What an action was done to: a kind (`endpoint`, `payment`, `deliveries`) and its id."""

    kind: str
    id: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


@dataclass(frozen=True)
class AuditEntry:
    audit_id: int
    at: datetime
    actor: str
    action: str
    target_kind: str
    target_id: str
    origin: str
    reason: str | None
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @property
    def target(self) -> Target:
        return Target(self.target_kind, self.target_id)

    def changed(self) -> list[tuple[str, Any, Any]]:
        """(field, before, after) for every field either side names, by name (jsonb keeps no
        order of its own)."""
        before, after = self.before or {}, self.after or {}
        return [(key, before.get(key), after.get(key)) for key in sorted({**before, **after})]

    def public(self) -> dict[str, Any]:
        """What `payment-service audit --json` and GET /admin/audit show."""
        return {
            "audit_id": self.audit_id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "target": {"kind": self.target_kind, "id": self.target_id},
            "origin": self.origin,
            "reason": self.reason,
            "before": self.before,
            "after": self.after,
        }


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    has_more: bool  # older entries match too: ask again with before_id = the last one's id


# -- writing --------------------------------------------------------------------------------------
def _json_value(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _document(fields: dict[str, Any] | None, side: str) -> str | None:
    if fields is None:
        return None
    text = json.dumps(fields, default=_json_value, ensure_ascii=False)
    if _SECRET.search(text):  # a bug in the caller, never something to store
        raise AuditError(f"the audit log never holds a secret: {side} has one")
    return text


def masked(reason: str | None) -> str | None:
    """A reason as the log keeps it: a secret typed into it is masked."""
    return None if reason is None else _SECRET.sub(SECRET_PREFIX + "…", reason)


# JSON goes in and comes out as text, whatever jsonb codec the connection has.
INSERT = Statement(
    """
    INSERT INTO audit_log (actor, action, target_kind, target_id, origin, reason, before, after)
    VALUES (:actor, :action, :target_kind, :target_id, :origin, :reason,
            :before::text::jsonb, :after::text::jsonb)
    RETURNING audit_id, at, actor, action, target_kind, target_id, origin, reason,
              before::text AS before, after::text AS after
    """
)


async def record(
    conn: asyncpg.Connection,
    *,
    operator: Operator,
    action: str,
    target: Target,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    reason: str | None = None,
) -> AuditEntry:
    """Record an operator's action, in the transaction of the change (refused outside one)."""
    if not conn.is_in_transaction():
        raise AuditError("an audit row is written in the transaction of the change it records")
    if not _ACTION.fullmatch(action):
        raise AuditError(f"an action is lower-case words joined by dots, not {action!r}")
    reason = masked(reason)
    if reason is not None and len(reason) > MAX_REASON_LENGTH:
        reason = reason[: MAX_REASON_LENGTH - 1] + "…"
    row = await conn.fetchrow(
        INSERT.sql,
        *INSERT.args(
            actor=operator.actor,
            action=action,
            target_kind=target.kind,
            target_id=target.id,
            origin=operator.origin,
            reason=reason,
            before=_document(before, "before"),
            after=_document(after, "after"),
        ),
    )
    assert row is not None
    return _entry(row)


def _entry(row: asyncpg.Record) -> AuditEntry:
    values = dict(row)
    for side in ("before", "after"):
        if values[side] is not None:
            values[side] = json.loads(values[side])
    return AuditEntry(**values)


Fields = dict[str, Any]


def changes(before: Fields, after: Fields) -> tuple[Fields, Fields]:
    """The fields whose value differs between two views of one thing, on each side."""
    keys = [key for key in {**before, **after} if before.get(key) != after.get(key)]
    return {k: before.get(k) for k in keys}, {k: after.get(k) for k in keys}


# -- reading --------------------------------------------------------------------------------------
# Each filter, by name; a query uses those given (`_page_statement`).
_FILTERS = {
    "since": "a.at >= :since",
    "until": "a.at < :until",
    "actor": "a.actor = :actor",
    "action": "a.action = :action",
    "action_prefix": "starts_with(a.action, :action_prefix)",
    "target_kind": "a.target_kind = :target_kind",
    "target_id": "a.target_id = :target_id",
    # The next page: entries older than the one named (by time, then id).
    "before_id": """(a.at, a.audit_id) < (SELECT b.at, b.audit_id
                                             FROM audit_log AS b
                                            WHERE b.audit_id = :before_id)""",
}


@functools.cache
def page_statement(filters: frozenset[str]) -> Statement:
    """The statement of one page with these filters (names of _FILTERS), newest first."""
    where = " AND ".join(_FILTERS[name] for name in sorted(filters)) or "TRUE"
    return Statement(
        f"""
        SELECT a.audit_id, a.at, a.actor, a.action, a.target_kind, a.target_id, a.origin,
               a.reason, a.before::text AS before, a.after::text AS after
          FROM audit_log AS a
         WHERE {where}
         ORDER BY a.at DESC, a.audit_id DESC
         LIMIT :limit
        """
    )


def target_filter(text: str) -> tuple[str | None, str]:
    """`kind:id` (`endpoint:trip`) or an id alone (`trip`, of any kind) → (kind, id)."""
    kind, colon, ident = text.partition(":")
    if colon and re.fullmatch(r"[a-z_]+", kind):
        return kind, ident
    return None, text


async def select_audit(
    conn: asyncpg.Connection,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    limit: int = 50,
    before_id: int | None = None,
) -> AuditPage:
    """One page of the log, newest first: entries at or after `since` and before `until`, by
    `actor` (exact), `action` (exact, or `endpoint.*` for every endpoint action) and `target`
    (`kind:id`, or an id of any kind), older than the entry `before_id` (the previous page's
    last); at most `limit` (1 to MAX_PAGE)."""
    if not 1 <= limit <= MAX_PAGE:
        raise AuditError(f"a page holds 1 to {MAX_PAGE} entries")
    values: dict[str, Any] = {
        "since": since,
        "until": until,
        "actor": actor,
        "before_id": before_id,
    }
    if action is not None and action.endswith(".*"):
        values["action_prefix"] = action[:-1]
    else:
        values["action"] = action
    if target is not None:
        values["target_kind"], values["target_id"] = target_filter(target)
    given = {name: value for name, value in values.items() if value is not None}
    statement = page_statement(frozenset(given))
    rows = await conn.fetch(statement.sql, *statement.args(**given, limit=limit + 1))
    return AuditPage([_entry(row) for row in rows[:limit]], has_more=len(rows) > limit)
