"""JSON text in which a Decimal is written as the number it is, never through a binary float.

The API keeps metadata numbers as Decimal (`0.1000000000000000055511151231257827` stays that), and
asyncpg's jsonb codec encodes with `dumps`, so they reach PostgreSQL's numeric-backed jsonb intact.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any


def dumps(value: Any, *, ensure_ascii: bool = True) -> str:
    """`json.dumps(value)`, except that a finite Decimal is written as its exact literal."""
    try:  # the C encoder: values without a Decimal, the common case
        return json.dumps(value, ensure_ascii=ensure_ascii)
    except TypeError:
        return _encode(value, ensure_ascii)


def _encode(value: Any, ensure_ascii: bool) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} is not a number JSON allows")
        return str(value)  # "0.29", "1E+400": both JSON number literals
    if isinstance(value, dict):
        items = (
            f"{json.dumps(str(key), ensure_ascii=ensure_ascii)}: {_encode(item, ensure_ascii)}"
            for key, item in value.items()
        )
        return "{" + ", ".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_encode(item, ensure_ascii) for item in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)
