"""Named placeholders compile to asyncpg's `$n` once, and values are matched to them by name."""

from __future__ import annotations

import re
import tokenize
from pathlib import Path

import pytest

from app import idempotency, payments, refunds
from payment_service.sql import Statement


def test_each_name_gets_the_number_of_its_first_use() -> None:
    statement = Statement("SELECT :b, :a, :b::text, x = :a")
    assert statement.sql == "SELECT $1, $2, $1::text, x = $2"
    assert statement.names == ("b", "a")
    assert statement.args(a=1, b="two") == ["two", 1]


def test_casts_quoted_text_and_comments_are_left_alone() -> None:
    text = """
        SELECT ':not_a' AS "col:umn", E'it\\'s :no', $$ :no $$, $tag$ :no $tag$,
               'a''b:c', x::jsonb, :yes /* :no */ -- :no
    """
    statement = Statement(text)
    assert statement.names == ("yes",)
    assert statement.sql == text.replace(":yes", "$1")


def test_missing_and_unknown_values_fail_loudly() -> None:
    statement = Statement("SELECT :a, :b")
    with pytest.raises(TypeError, match=r"missing \['b'\], unknown \[\]"):
        statement.args(a=1)
    with pytest.raises(TypeError, match=r"missing \[\], unknown \['c'\]"):
        statement.args(a=1, b=2, c=3)


def test_a_positional_number_cannot_be_mixed_in() -> None:
    with pytest.raises(ValueError, match=r"positional \$1"):
        Statement("SELECT :a, $1")
    assert Statement("SELECT '$1', :a").names == ("a",)  # in quoted text it is just text


@pytest.mark.parametrize(
    "statement",
    [
        idempotency.CLAIM_KEY,
        idempotency.STORE_DECIDED_ANSWER,
        payments.INSERT_PAYMENT,
        payments.SETTLE_PAYMENT,
        refunds.INSERT_REFUND,
        payments.payments_page_statement(frozenset({"trip_id", "status", "starting_after"})),
    ],
    ids=["claim_key", "store_decided_answer", "insert_payment", "settle", "refund", "page"],
)
def test_the_apis_statements_are_numbered_in_one_piece(statement: Statement) -> None:
    """One value per name, and every $n from 1 to the last is used."""
    numbers = {int(n) for n in re.findall(r"\$(\d+)", statement.sql)}
    assert numbers == set(range(1, len(statement.names) + 1))
    assert len(set(statement.names)) == len(statement.names)


PACKAGES = ("app", "outbox_relay", "payment_cli", "payment_service")
ROOT = Path(__file__).resolve().parents[2]


def positional_placeholders(path: Path) -> list[str]:
    """The `$n` in the string literals of a module (its SQL), as `line: text`."""
    found = []
    with path.open("rb") as source:
        for token in tokenize.tokenize(source.readline):
            if token.type == tokenize.STRING and re.search(r"\$[0-9]", token.string):
                found.append(f"{token.start[0]}: {token.string.strip()[:60]}")
    return found


def test_statements_are_written_with_named_placeholders() -> None:
    modules = [
        path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.relative_to(ROOT).as_posix() != "payment_service/sql.py"  # says what `$n` is
    ]
    assert len(modules) > 50
    positional = {
        path.relative_to(ROOT).as_posix(): found
        for path in modules
        if (found := positional_placeholders(path))
    }
    assert positional == {}, (
        f"write these statements with :names (payment_service.sql.Statement): {positional}"
    )
