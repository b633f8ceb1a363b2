"""Each list of values is written once, in payment_service/vocabulary.py; the migrations repeat it
as a CHECK constraint, which SQL cannot import. Read from a migrated database, every constraint
that lists a column's values lists exactly the values of its Python list, and every such
constraint has a Python list: a value added on one side only (a migration's new event type, a
status the code writes) fails here, naming both."""

from __future__ import annotations

import re

import asyncpg

from payment_service import vocabulary

# (table, column) -> the Python list its CHECK constraint must equal.
LISTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("payments", "method"): vocabulary.PAYMENT_METHODS,
    ("payments", "status"): vocabulary.PAYMENT_STATUSES,
    ("payment_refunds", "status"): vocabulary.REFUND_STATUSES,
    ("outbox_events", "event_type"): vocabulary.EVENT_TYPES,
    ("deliveries", "status"): vocabulary.DELIVERY_STATUSES,
    ("endpoints", "state"): vocabulary.ENDPOINT_STATES,
    ("gateway_operations", "kind"): vocabulary.OPERATION_KINDS,
    ("gateway_operations", "phase"): vocabulary.OPERATION_PHASES,
}

# Every CHECK constraint on one column of a table in the public schema, as PostgreSQL prints it
# back: `col IN ('A', 'B')` reads `((col)::text = ANY ((ARRAY['A'::character varying, …])))`.
CHECKS_SQL = """
SELECT c.conrelid::regclass::text AS table_name,
       a.attname                  AS column_name,
       pg_get_constraintdef(c.oid) AS definition
  FROM pg_constraint AS c
  JOIN pg_attribute AS a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
 WHERE c.contype = 'c'
   AND cardinality(c.conkey) = 1
   AND c.connamespace = 'public'::regnamespace
"""
_LIST = re.compile(r"= ANY \(+ARRAY\[(?P<values>[^\]]*)\]")
_VALUE = re.compile(r"'((?:[^']|'')*)'")


async def listed_values(db: asyncpg.Connection) -> dict[tuple[str, str], list[str]]:
    """(table, column) -> the values its CHECK constraint lists, for each constraint that lists
    values."""
    found: dict[tuple[str, str], list[str]] = {}
    for row in await db.fetch(CHECKS_SQL):
        listed = _LIST.search(row["definition"])
        if listed is None:
            continue
        values = [value.replace("''", "'") for value in _VALUE.findall(listed["values"])]
        found[(row["table_name"], row["column_name"])] = values
    return found


def test_the_reading_of_a_constraint() -> None:
    definition = (
        "CHECK (((method)::text = ANY ((ARRAY['CARD'::character varying, 'it''s'::character "
        "varying])::text[])))"
    )
    listed = _LIST.search(definition)
    assert listed is not None
    assert _VALUE.findall(listed["values"]) == ["CARD", "it''s"]


async def test_every_constraint_lists_its_python_values(db: asyncpg.Connection) -> None:
    found = await listed_values(db)
    assert set(found) == set(LISTS), (
        "CHECK constraints listing values, without a list in payment_service/vocabulary.py "
        f"(add one, and a line in LISTS here): {sorted(set(found) - set(LISTS))}; "
        f"lists here without such a constraint: {sorted(set(LISTS) - set(found))}"
    )
    for (table, column), python in LISTS.items():
        sql = found[(table, column)]
        assert sorted(sql) == sorted(python), (
            f"{table}.{column}: the migrations' CHECK lists {sql}, payment_service/vocabulary.py "
            f"{list(python)}; make them the same (a migration for the constraint, or the list)"
        )
        assert len(set(python)) == len(python), f"{table}.{column}: a value twice in {python}"
