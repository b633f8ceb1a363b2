"""Endpoint input that both the command line and the admin API must refuse, the same way: each
case is the field, what is sent, and words of the refusal (the core's message, which both show).
tests/e2e/test_cli_endpoint_input.py sends them to `endpoints add`, and
tests/integration/test_api_admin_input.py to `POST /admin/endpoints`."""

from __future__ import annotations

from dataclasses import dataclass

LONG_URL = "http://127.0.0.1:9/" + "a" * 1990  # 2009 characters


@dataclass(frozen=True)
class BadInput:
    field: str  # name, url, event_types, secret
    value: str | list[str]
    words: str

    @property
    def label(self) -> str:
        return f"{self.field}:{str(self.value)[:40]!r}"


BAD_INPUTS = [
    BadInput("url", "http://127.0.0.1:99999/x", "port '99999' is not a number from 1 to 65535"),
    BadInput("url", "http://:8097/x", "no host"),
    BadInput("url", "http://127.0.0.1:9/caf\u00e9", "percent-encode it (e.g. %C3%A9)"),
    BadInput("url", "http://[::1/x", "broken IPv6 address"),
    BadInput("url", "http://user:secret-pass@127.0.0.1:9/x", "credentials (user:password@)"),
    BadInput("url", "http://127.0.0.1:9/x#part", "a fragment (#…) is never sent"),
    BadInput("url", LONG_URL, "longer than 2000 characters"),
    BadInput("url", "http://127.0.0.1:9/\x1b[2J", "a control character ('\\x1b')"),
    BadInput("url", "http://169.254.169.254/latest/meta-data", "a link-local address"),
    BadInput("url", "ftp://127.0.0.1/x", "http:// or https://"),
    BadInput("event_types", ["payment.succeeded"] * 11, "at most 10 event types"),
    BadInput("event_types", ["payment.created"], "unknown event type 'payment.created'"),
    BadInput("name", "trip\n", "invalid endpoint name 'trip\\n'"),
    BadInput("name", "Trip", "invalid endpoint name 'Trip'"),
    BadInput("secret", "whsec_" + "A" * 300, "a secret is at most 200 characters"),
    BadInput("secret", "whsec_" + "A" * 28, "at least 24 random bytes"),
]
