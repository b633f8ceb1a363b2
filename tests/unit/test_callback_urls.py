"""The one reading of an endpoint URL (`parse_callback_url`), the checks the command line and the
admin API make with it (`endpoints.check_*`), and where callbacks may go (`NetworkPolicy`).

Pure functions: addresses here are values that are compared, never connected to."""

from __future__ import annotations

import ipaddress

import pytest

from payment_service import endpoints
from payment_service.callback_urls import (
    MAX_URL_LENGTH,
    CallbackURLError,
    NetworkPolicy,
    network_policy,
    parse_callback_url,
    parse_networks,
)
from payment_service.config import ConfigurationError, load_settings
from payment_service.endpoints import InvalidEndpoint

PRODUCTION = network_policy(production=True)
DEVELOPMENT = network_policy(production=False)

# Each URL shape that crashed the relay's endpoint loop before (and the admin API and the command
# line accepted), with the words its refusal names. tests/e2e/test_relay_unservable_endpoints.py
# writes the same shapes straight into the table.
UNSENDABLE = [
    ("http://127.0.0.1:99999/x", "port '99999'"),
    ("http://:8097/x", "no host"),
    ("http://127.0.0.1:8097/caf\u00e9", "percent-encode it (e.g. %C3%A9)"),
    ("http://127.0.0.1:8097/\u96fb\u5b50", "percent-encode"),
    ("http://[::1/x", "broken IPv6"),
    ("http://::1]/x", "broken IPv6"),
    ("http://[::1]x/y", "broken IPv6"),
    ("http://127.0.0.1:0/x", "port '0'"),
    ("http://127.0.0.1:+80/x", "port '+80'"),
    ("http://127.0.0.1:\uff18\uff10/x", "port"),  # full-width digits
    ("http://[fe80::1%25eth0]/x", "zone"),
    ("http://[not-v6]/x", "IPv6 address"),
    ("http://::1/x", "IPv6 address goes in [brackets]"),
    ("http://exa!mple.com/x", "not a DNS name"),
    ("http://-bad.example/x", "not a DNS name"),
    ("http://127.1/x", "four decimal numbers"),
    ("http://2130706433/x", "four decimal numbers"),
    ("http://0x7f.0.0.1/x", "four decimal numbers"),
    ("http://010.0.0.1/x", "four decimal numbers"),
    ("http://h/a b", "a space"),
    ("http://h/\x1b[2J", "control character"),
    ("http://h/x\x00", "control character"),
    ("ftp://h/x", "http:// or https://"),
    ("HTTP://h/x", "http:// or https://"),
    ("//h/x", "http:// or https://"),
]


@pytest.mark.parametrize(("url", "words"), UNSENDABLE)
def test_what_no_request_can_be_made_to_is_refused_by_the_part_at_fault(
    url: str, words: str
) -> None:
    with pytest.raises(CallbackURLError) as refused:
        parse_callback_url(url)
    assert words in str(refused.value)
    with pytest.raises(InvalidEndpoint) as invalid:
        endpoints.check_url(url)
    assert invalid.value.field == "url"
    assert words in str(invalid.value)


@pytest.mark.parametrize(
    ("url", "host", "port", "host_header", "target"),
    [
        ("http://trips.internal/cb", "trips.internal", 80, "trips.internal", "/cb"),
        ("https://Trips.Example.COM/cb?x=1&y", "trips.example.com", 443, "trips.example.com",
         "/cb?x=1&y"),
        ("http://10.0.0.7:8081", "10.0.0.7", 8081, "10.0.0.7:8081", "/"),
        ("http://h:/x", "h", 80, "h", "/x"),
        ("https://h:443/x", "h", 443, "h", "/x"),
        ("http://[::1]:8085/n", "::1", 8085, "[::1]:8085", "/n"),
        ("http://[2001:DB8::1]/n", "2001:db8::1", 80, "[2001:db8::1]", "/n"),
        ("http://b\u00fccher.example/x", "xn--bcher-kva.example", 80, "xn--bcher-kva.example",
         "/x"),
        ("http://my_service.svc.cluster.local/cb", "my_service.svc.cluster.local", 80,
         "my_service.svc.cluster.local", "/cb"),
        ("http://h/caf%C3%A9/%7Bx%7D", "h", 80, "h", "/caf%C3%A9/%7Bx%7D"),
    ],
)  # fmt: skip
def test_what_the_relay_sends_to(
    url: str, host: str, port: int, host_header: str, target: str
) -> None:
    parsed = parse_callback_url(url)
    assert (parsed.host, parsed.port, parsed.host_header, parsed.target) == (
        host,
        port,
        host_header,
        target,
    )
    assert endpoints.check_url(url) == url


def test_credentials_and_fragments_are_read_but_refused_as_input() -> None:
    parsed = parse_callback_url("https://user:pa55@h.example:8443/cb#top")
    assert parsed.has_credentials and parsed.has_fragment
    assert parsed.without_credentials() == "https://h.example:8443/cb"
    with pytest.raises(InvalidEndpoint, match="credentials") as refused:
        endpoints.check_url("https://user:pa55@h.example/cb")
    assert "pa55" not in str(refused.value), "a refusal never repeats the URL"
    with pytest.raises(InvalidEndpoint, match="credentials"):
        endpoints.check_url("https://token@h.example/cb")
    with pytest.raises(InvalidEndpoint, match="fragment"):
        endpoints.check_url("https://h.example/cb#top")


def test_url_length() -> None:
    base = "https://h.example/"
    endpoints.check_url(base + "a" * (MAX_URL_LENGTH - len(base)))
    with pytest.raises(InvalidEndpoint, match=f"longer than {MAX_URL_LENGTH}"):
        endpoints.check_url(base + "a" * (MAX_URL_LENGTH - len(base) + 1))


# -- where callbacks may go -----------------------------------------------------------------------
REFUSED_EVERYWHERE = [
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("169.254.0.1", "link-local"),
    ("fe80::1", "link-local"),
    ("::ffff:169.254.169.254", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("::", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("ff02::1", "multicast"),
]
LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"]
# Private ranges (the platform's services live there) and public addresses.
ALLOWED = ["10.0.0.7", "172.16.5.4", "192.168.1.20", "100.64.0.1", "fd00::7", "8.8.8.8", "2001::1"]


@pytest.mark.parametrize(("address", "kind"), REFUSED_EVERYWHERE)
def test_link_local_unspecified_and_multicast_are_refused_everywhere(
    address: str, kind: str
) -> None:
    for policy in (PRODUCTION, DEVELOPMENT):
        refusal = policy.refusal(ipaddress.ip_address(address))
        assert refusal is not None and kind in refusal


@pytest.mark.parametrize("address", LOOPBACK)
def test_loopback_is_refused_in_production_only(address: str) -> None:
    assert PRODUCTION.refusal(ipaddress.ip_address(address)) == "a loopback address"
    assert DEVELOPMENT.refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize("address", ALLOWED)
def test_private_and_public_addresses_are_allowed(address: str) -> None:
    assert PRODUCTION.refusal(ipaddress.ip_address(address)) is None


def test_listed_networks_are_allowed() -> None:
    policy = network_policy(
        production=True, allowed=parse_networks(("127.0.0.0/8", "169.254.10.0/24", "::1"))
    )
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "169.254.10.5", "::1"):
        assert policy.refusal(ipaddress.ip_address(address)) is None, address
    assert policy.refusal(ipaddress.ip_address("169.254.169.254")) == "a link-local address"


def test_a_literal_address_is_checked_when_the_endpoint_is_added() -> None:
    for url in ("http://127.0.0.1:8085/n", "http://[::1]/n", "http://localhost:8085/n",
                "http://api.localhost/n", "http://[::ffff:127.0.0.1]/n"):  # fmt: skip
        with pytest.raises(InvalidEndpoint, match="loopback address") as refused:
            endpoints.check_url(url, PRODUCTION)
        assert "ENDPOINT_ALLOWED_NETWORKS" in str(refused.value)
        assert endpoints.check_url(url, DEVELOPMENT) == url
    with pytest.raises(InvalidEndpoint, match="link-local"):
        endpoints.check_url("http://169.254.169.254/latest/meta-data", DEVELOPMENT)
    # A name is checked where it is resolved: when the relay connects.
    assert endpoints.check_url("http://notification.internal/n", PRODUCTION)
    allowed = NetworkPolicy(allow_loopback=False, allowed=parse_networks(("127.0.0.0/8",)))
    assert endpoints.check_url("http://127.0.0.1:8085/n", allowed)


def test_allowed_networks_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENDPOINT_ALLOWED_NETWORKS", " 127.0.0.0/8, fd12::/16 ,::1")
    settings = load_settings()
    assert [str(n) for n in settings.endpoint_allowed_networks] == [
        "127.0.0.0/8",
        "fd12::/16",
        "::1/128",
    ]
    assert settings.callback_networks.allow_loopback  # development
    for wrong, words in (("10.0.0.1/8", "host bits set"), ("intranet", "not a network")):
        monkeypatch.setenv("ENDPOINT_ALLOWED_NETWORKS", wrong)
        with pytest.raises(ConfigurationError, match="ENDPOINT_ALLOWED_NETWORKS") as refused:
            load_settings()
        assert words in str(refused.value)
    monkeypatch.delenv("ENDPOINT_ALLOWED_NETWORKS")
    production = load_settings(
        environment="production",
        api_keys="app:a-token-for-tests-only",
        callback_signing_secret="whsec_" + "A" * 32,
        gateway="none",
    )
    assert production.callback_networks == NetworkPolicy(allow_loopback=False)


# -- the other checks the command line and the admin API share ------------------------------------
def test_names() -> None:
    assert endpoints.check_name("trip-2_b") == "trip-2_b"
    for name in ("Trip", "trip\n", "-trip", "x" * 64, "", "tr ip", "trip\x1b"):
        with pytest.raises(InvalidEndpoint, match="invalid endpoint name") as refused:
            endpoints.check_name(name)
        assert refused.value.field == "name"


def test_event_types() -> None:
    assert endpoints.check_event_types(["payment.*", " * ", "payment.*"]) == ("payment.*", "*")
    with pytest.raises(InvalidEndpoint, match="at most 10"):
        endpoints.check_event_types(["payment.succeeded"] * 11)
    with pytest.raises(InvalidEndpoint, match="at least one"):
        endpoints.check_event_types([" ", ""])
    with pytest.raises(InvalidEndpoint, match="unknown event type") as refused:
        endpoints.check_event_types(["payment.created"])
    assert refused.value.field == "event_types"


def test_secrets() -> None:
    good = "whsec_" + "A" * 32
    assert endpoints.check_secret(good) == good
    for secret, words in (
        ("plain", "whsec_"),
        ("whsec_" + "A" * 28, "24 random bytes"),
        ("whsec_" + "A" * 300, "at most 200"),
        ("whsec_" + "A" * 31 + "\x1b", "not valid base64"),
        ("whsec_" + "\u00e9" * 32, "not valid base64"),
    ):
        with pytest.raises(InvalidEndpoint, match=words) as refused:
            endpoints.check_secret(secret)
        assert refused.value.field == "secret"
        assert secret[6:20] not in str(refused.value) or secret == "plain", "never repeated"


def test_reasons() -> None:
    assert endpoints.check_reason("receiver migrating to v2") == "receiver migrating to v2"
    for reason, words in (
        ("a" * 501, "at most 500"),
        ("x\x1b[2J", "control"),
        ("a\nb", "one line"),
    ):
        with pytest.raises(InvalidEndpoint, match=words):
            endpoints.check_reason(reason)
