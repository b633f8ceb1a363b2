"""Callback URLs: what the relay can send a callback to, and which addresses callbacks may reach.

`parse_callback_url` is the one reading of an endpoint's URL. The relay's HTTP client builds its
requests from what it returns, and the command line and the admin API check every URL they take
with it (payment_service.endpoints.check_url), so a URL they accept is one the relay can use. It
refuses what no request can be made to: a port outside 1-65535, an empty host, a broken IPv6
bracket, raw non-ASCII or control characters in the path, a host that is not a DNS name or an IP
address. Its messages name the part at fault and never repeat the URL, which may carry a password.

`NetworkPolicy` says which addresses callbacks may reach. The relay checks the address a name
resolves to when it connects, so a name that resolves to one address at `endpoints add` and to
another later (DNS rebinding) is caught where it matters. Outside production loopback is allowed
(local receivers, tests); link-local (169.254.0.0/16 and fe80::/10: cloud metadata services),
unspecified (0.0.0.0/8, ::) and multicast addresses never are, nor is loopback in production,
unless ENDPOINT_ALLOWED_NETWORKS lists them. Private ranges stay allowed: the platform's services
live there.

Pure functions only (no I/O), so the settings can use them and the tests check them directly.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_LENGTH = 2000  # characters: far beyond any real callback URL, and bounds what we store
MAX_HOST_LENGTH = 253  # a DNS name's limit
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# What the request line may carry of the path and query: visible ASCII, nothing else.
_REQUEST_TARGET = re.compile(r"[\x21-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Hosts a resolver answers with a loopback address without asking DNS (RFC 6761).
_LOOPBACK_NAMES = re.compile(r"(?:.+\.)?localhost\.?")

_BROKEN_IPV6 = "a broken IPv6 address (it goes in [brackets], closed)"
# This network (RFC 1122): 0.0.0.0 itself connects to the local host on Linux.
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


class CallbackURLError(ValueError):
    """A URL no callback can be sent to; the message names the part at fault."""


@dataclass(frozen=True, slots=True)
class CallbackURL:
    """An endpoint URL as the relay sends to it."""

    scheme: str  # http or https
    host: str  # ASCII: a DNS name (IDNA-encoded, lower case) or an IP address without brackets
    port: int
    target: str  # the request line's path and query
    has_credentials: bool = False  # `user:pass@` (never sent)
    has_fragment: bool = False  # `#…` (never sent)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.tls else 80)

    @property
    def host_header(self) -> str:
        """The `Host` header: the host (IPv6 in brackets), and the port unless the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.default_port else f"{host}:{self.port}"

    @property
    def address(self) -> Address | None:
        """The host as an IP address, when it is written as one."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def without_credentials(self) -> str:
        """The URL as sent (no user, password or fragment), for logs."""
        return f"{self.scheme}://{self.host_header}{self.target}"


def parse_callback_url(url: str) -> CallbackURL:
    """Read an endpoint URL as the relay will use it; CallbackURLError when no request can be
    made to it. Credentials and a fragment are allowed here (the relay sends neither): whether a
    URL may carry them is for `endpoints.check_url` to say."""
    if (control := _CONTROL.search(url)) is not None:
        raise CallbackURLError(
            f"a control character ({control.group()!r}) at position {control.start() + 1}"
        )
    if " " in url:
        raise CallbackURLError("a space: percent-encode it (%20)")
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise CallbackURLError("it must start with http:// or https://")
    try:
        parts = urlsplit(url)
    except ValueError:  # urlsplit's own refusal: a broken bracket, or no IPv6 address in it
        raise CallbackURLError(_BROKEN_IPV6) from None
    _userinfo, at, hostport = parts.netloc.rpartition("@")
    host, port = _host_and_port(hostport, default=443 if scheme == "https" else 80)
    path = parts.path or "/"
    target = path + (f"?{parts.query}" if parts.query or url.endswith("?") else "")
    if not _REQUEST_TARGET.fullmatch(target):
        odd = next(c for c in target if not _REQUEST_TARGET.fullmatch(c))
        raise CallbackURLError(
            f"the character {odd!r} in the path or query: percent-encode it "
            f"(e.g. {''.join(f'%{b:02X}' for b in odd.encode())})"
        )
    return CallbackURL(
        scheme=scheme,
        host=host,
        port=port,
        target=target,
        has_credentials=bool(at),
        has_fragment="#" in url,
    )


def _host_and_port(hostport: str, *, default: int) -> tuple[str, int]:
    if hostport.startswith("["):
        literal, bracket, rest = hostport[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise CallbackURLError(_BROKEN_IPV6)
        if "%" in literal:
            raise CallbackURLError("an IPv6 zone (%…) is not supported")
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise CallbackURLError("what is in [brackets] is not an IPv6 address") from None
        return host, _port(rest[1:], default) if rest else default
    if "[" in hostport or "]" in hostport:
        raise CallbackURLError(_BROKEN_IPV6)
    host, colon, port_text = hostport.partition(":")
    if ":" in port_text:
        raise CallbackURLError("an IPv6 address goes in [brackets]")
    return _host(host), _port(port_text, default) if colon else default


def _port(text: str, default: int) -> int:
    if not text:
        return default  # `http://host:/x`: RFC 3986 allows an empty port
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise CallbackURLError(f"port {text[:20]!r} is not a number from 1 to 65535")
    return int(text)


def _host(host: str) -> str:
    """A DNS name (non-ASCII becomes IDNA) or a dotted IPv4 address, in lower case."""
    if not host:
        raise CallbackURLError("no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise CallbackURLError("the host is not a valid internationalised name") from None
    host = host.lower()
    labels = host.removesuffix(".").split(".")
    if len(host) > MAX_HOST_LENGTH or not all(_LABEL.fullmatch(label) for label in labels):
        raise CallbackURLError(
            "the host is not a DNS name (letters, digits, '-', '_', dots) or an IP address"
        )
    # A name whose last label is a number is an IPv4 address to a resolver (`127.1`, `2130706433`
    # and `0x7f.1` all reach 127.0.0.1): only the plain dotted form is taken, so that what the
    # address checks see is what the resolver connects to.
    if re.fullmatch(r"[0-9]+|0x[0-9a-f]*", labels[-1]):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise CallbackURLError(
                "an IPv4 address is written as four decimal numbers (e.g. 10.0.0.7)"
            ) from None
    return host


# -- where callbacks may go -----------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkPolicy:
    """Which addresses callbacks may reach: see the module's docstring."""

    allow_loopback: bool
    allowed: tuple[Network, ...] = field(default=())

    def refusal(self, address: Address) -> str | None:
        """None when a callback may go to `address`, else what kind of address it is."""
        if any(
            address in network for network in self.allowed if network.version == address.version
        ):
            return None
        plain = _unmapped(address)
        if plain is not address and any(
            plain in network for network in self.allowed if network.version == plain.version
        ):
            return None
        if plain.is_loopback:
            return None if self.allow_loopback else "a loopback address"
        if plain.is_link_local:
            return "a link-local address"
        if plain.is_unspecified or plain in _THIS_NETWORK:
            return "an unspecified address"
        if plain.is_multicast:
            return "a multicast address"
        return None

    def refuses_name(self, host: str) -> bool:
        """Whether `host` is a name that always means loopback (`localhost`) and loopback is
        refused: the check an address literal gets, for the names that are as good as one."""
        return not self.allow_loopback and _LOOPBACK_NAMES.fullmatch(host) is not None


def network_policy(*, production: bool, allowed: tuple[Network, ...] = ()) -> NetworkPolicy:
    """The policy of an environment: loopback is refused in production only."""
    return NetworkPolicy(allow_loopback=not production, allowed=allowed)


def refusal_message(host: str, address: Address, kind: str) -> str:
    """Why a callback may not go to `address` (which `host` is or resolved to)."""
    where = str(address) if host == str(address) else f"{host} ({address})"
    return (
        f"{where} is {kind}, where callbacks may not go: list its network in "
        "ENDPOINT_ALLOWED_NETWORKS to allow it"
    )


def parse_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """ENDPOINT_ALLOWED_NETWORKS: CIDRs (`10.0.0.0/8`, `fd00::/8`) or single addresses."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError as error:
            raise ValueError(
                f"{entry[:60]!r} is not a network such as 10.0.0.0/8: {error}"
            ) from None
    return tuple(networks)


def _unmapped(address: Address) -> Address:
    """The IPv4 address inside an IPv4-mapped IPv6 one (::ffff:127.0.0.1 is 127.0.0.1)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
