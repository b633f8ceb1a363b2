"""What the relay writes about an attempt is always storable, whatever the receiver answered."""

from __future__ import annotations

import json

from outbox_relay.outbox import ERROR_TEXT_LIMIT, safe_status_code, safe_text


def test_nul_and_lone_surrogates_become_replacement_characters() -> None:
    assert safe_text("HTTP 500: a\x00b") == "HTTP 500: a\ufffdb"
    assert safe_text("x\ud800y\udfffz") == "x\ufffdy\ufffdz"
    assert safe_text("\x00" * 3) == "\ufffd" * 3
    kept = "ok é ✓ 𝄞 \t\n\x01"  # everything else is kept as it is
    assert safe_text(kept) == kept


def test_the_text_is_bounded_and_encodes() -> None:
    cleaned = safe_text("\ud800\x00é" * 1000)
    assert cleaned is not None and len(cleaned) == ERROR_TEXT_LIMIT
    cleaned.encode("utf-8")  # raises on a lone surrogate
    assert "\\u0000" not in json.dumps(cleaned)  # jsonb refuses \u0000
    assert safe_text("abcdef", limit=3) == "abc"
    assert safe_text(None) is None


def test_a_status_code_the_row_cannot_hold_is_none() -> None:
    assert [safe_status_code(c) for c in (100, 200, 599)] == [100, 200, 599]
    assert [safe_status_code(c) for c in (None, 0, 99, 600, 999)] == [None] * 5
