"""JSON text in which a Decimal is written as the number it is, never through a binary float.

The API keeps metadata numbers as Decimal (`0.1000000000000000055511151231257827` stays that), and
asyncpg's jsonb codec encodes with `dumps`, so they reach PostgreSQL's numeric-backed jsonb intact.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any


def dumps(
    value: Any, *, ensure_ascii: bool = True, sort_keys: bool = False, compact: bool = False
) -> str:
    """`json.dumps(value)`, except that a finite Decimal is written as its exact literal.

    `sort_keys` and `compact` (no spaces after `,` and `:`) are json.dumps's, for canonical forms.
    """
    item_sep, key_sep = (",", ":") if compact else (", ", ": ")
    try:  # the C encoder: values without a Decimal, the common case
        return json.dumps(
            value, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=(item_sep, key_sep)
        )
    except TypeError:
        return _Encoder(ensure_ascii, sort_keys, item_sep, key_sep).encode(value)


class _Encoder:
    def __init__(self, ensure_ascii: bool, sort_keys: bool, item_sep: str, key_sep: str) -> None:
        self.ensure_ascii = ensure_ascii
        self.sort_keys = sort_keys
        self.item_sep = item_sep
        self.key_sep = key_sep

    def encode(self, value: Any) -> str:
        if isinstance(value, Decimal):
            if not value.is_finite():
                raise ValueError(f"{value} is not a number JSON allows")
            return str(value)  # "0.29", "1E+400": both JSON number literals
        if isinstance(value, dict):
            pairs = sorted(value.items()) if self.sort_keys else value.items()
            items = (
                json.dumps(str(key), ensure_ascii=self.ensure_ascii)
                + self.key_sep
                + self.encode(item)
                for key, item in pairs
            )
            return "{" + self.item_sep.join(items) + "}"
        if isinstance(value, list | tuple):
            return "[" + self.item_sep.join(self.encode(item) for item in value) + "]"
        return json.dumps(value, ensure_ascii=self.ensure_ascii)
