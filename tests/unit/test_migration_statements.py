"""`split_statements`: a no-transaction migration is sent one statement at a time, so its split
must ignore the semicolons inside strings, identifiers, dollar-quoted bodies and comments."""

from __future__ import annotations

import pytest

from payment_service.migrations import Migration, split_statements


def test_plain_statements() -> None:
    sql = "CREATE TABLE a (id int);\nCREATE INDEX CONCURRENTLY a_id ON a (id);\n"
    assert split_statements(sql) == [
        "CREATE TABLE a (id int);",
        "CREATE INDEX CONCURRENTLY a_id ON a (id);",
    ]


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT 'a;b', 'it''s; here';",
        r"SELECT E'back\'slash; still inside';",
        'SELECT 1 AS "odd;name", 2 AS "quote"";inside";',
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;",
        "DO $body$ BEGIN PERFORM 'x$$;'; END $body$;",
        "SELECT 1 /* a; /* nested; */ still comment; */ + 1;",
        "SELECT 1 -- trailing; comment\n + 1;",
    ],
)
def test_semicolons_that_end_nothing(statement: str) -> None:
    assert split_statements(f"{statement}\nSELECT 2;") == [statement, "SELECT 2;"]


def test_text_after_the_last_semicolon_is_a_statement_unless_blank() -> None:
    assert split_statements("SELECT 1;\n\n  ") == ["SELECT 1;"]
    assert split_statements("SELECT 1; SELECT 2") == ["SELECT 1;", "SELECT 2"]


def test_marker_is_the_first_line_only() -> None:
    marked = Migration(1, "x", "-- migrate: no-transaction\nCREATE INDEX CONCURRENTLY …;")
    unmarked = Migration(1, "x", "-- about this file\n-- migrate: no-transaction\nSELECT 1;")
    assert not marked.transactional
    assert unmarked.transactional
