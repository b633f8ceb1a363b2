"""`printable`: what the commands print of a value from outside shows as text; no terminal control
in it reaches the terminal."""

from __future__ import annotations

import pytest

from payment_service.entry import printable


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("HTTP 500: \x1b]0;owned\x07\x1b[2J", "HTTP 500: \\x1b]0;owned\\x07\\x1b[2J"),
        ("line\nforged line\r", "line\\nforged line\\r"),
        ("tab\there", "tab\\there"),
        ("nul\x00 del\x7f csi\x9b", "nul\\x00 del\\x7f csi\\x9b"),
        ("\u202egnp.exe", "\\u202egnp.exe"),  # right-to-left override
        ("a\u2028b\u2066c", "a\\u2028b\\u2066c"),
        ("caf\u00e9 \u96fb\u5b50 \\x1b", "caf\u00e9 \u96fb\u5b50 \\x1b"),  # text stays text
    ],
)
def test_terminal_controls_are_escaped(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_anything_is_shown_as_its_text() -> None:
    assert printable(ValueError("bad\x1b")) == "bad\\x1b"
    assert printable(42) == "42"
