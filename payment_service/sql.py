"""Named parameters for the SQL sent through asyncpg, so each statement reads on its own.

The rule: every statement the service sends is written with named placeholders (`:key_hash`) as a
`Statement`, and run as `conn.fetch(S.sql, *S.args(key_hash=…))`; no module writes asyncpg's
positional `$1, $2, …` itself. A value is then named where it is used, a statement composed of
fragments from several modules (the idempotency row's CTE, the payment's outbox event) has no
numbering spanning them, and a test that EXPLAINs a statement runs exactly what the code sends
(`S.sql`, with `S.args(…)`). A unit test fails when a module writes `$n` again.

`Statement` compiles the text once, at import, into the `$n` form: each name gets the number of
its first appearance and every later use of the name reuses it. `Statement.args` maps keyword
values to those positions; a missing or unknown name raises TypeError at the call, and a positional
`$n` in the text raises ValueError at import, so the two styles never mix in one statement. The text
sent is fixed at import, which keeps asyncpg's prepared-statement cache hitting.

Placeholders are recognised outside quoted text ('…', E'…', "…", $tag$…$tag$) and comments;
`::type` casts are left alone.
"""

from __future__ import annotations

import re
from typing import Any

# Spans in which a colon is not a placeholder, then the two things a statement may not mix.
_TOKEN = re.compile(
    r"""(?P<skip>
            [eE]'(?:[^'\\]|\\.|'')*'
          | '(?:[^']|'')*'
          | "(?:[^"]|"")*"
          | --[^\n]*
          | /\*.*?\*/
          | (?P<tag>\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$).*?(?P=tag)
          | ::
        )
      | :(?P<name>[A-Za-z_][A-Za-z_0-9]*)
      | (?P<number>\$[0-9]+)""",
    re.VERBOSE | re.DOTALL,
)


class Statement:
    """A SQL statement written with `:name` placeholders, compiled to asyncpg's `$n` form."""

    __slots__ = ("names", "sql", "text")

    def __init__(self, text: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match["number"]:
                raise ValueError(f"positional {match['number']} in a statement with named ones")
            name = match["name"]
            if name is None:
                return match[0]
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.text = text  # as written, with :names
        self.sql: str = _TOKEN.sub(number, text)  # as sent, with $n
        self.names: tuple[str, ...] = tuple(names)  # names[n - 1] is $n

    def args(self, **values: Any) -> list[Any]:
        """The positional arguments for `sql`, from one keyword value per name."""
        if values.keys() != set(self.names):
            missing = sorted(set(self.names) - values.keys())
            unknown = sorted(values.keys() - set(self.names))
            raise TypeError(f"statement values: missing {missing}, unknown {unknown}")
        return [values[name] for name in self.names]

    def __repr__(self) -> str:
        return f"Statement({self.text!r})"
