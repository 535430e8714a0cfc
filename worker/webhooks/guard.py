"""The SSRF guard: webhooks reach public http(s) addresses only, unless the operator allows private ones.

Checked twice. At submit, ``check_url`` refuses what the URL alone shows to be wrong (a scheme
other than http/https, a literal non-public address in any spelling a resolver accepts —
``0x7f000001``, ``2130706433``, ``0177.0.0.1``, ``[::ffff:127.0.0.1]`` — or ``localhost``).
At send, ``resolve`` looks the host up and checks every address it has; the sender then
connects to a checked address, so a DNS answer that changes in between cannot redirect it.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAT64 = ipaddress.ip_network("64:ff9b::/96")
# The shorthand IPv4 forms that inet_aton (and so getaddrinfo) accepts: 1 to 4 parts, decimal, octal or hex.
_NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)


class Refused(Exception):
    """A URL that webhooks may not go to; the message says why, in words a client can act on."""


class Unresolvable(Exception):
    """The host name did not resolve (perhaps only for now: the delivery is retried)."""


@dataclass(frozen=True)
class Target:
    """Where a webhook goes: what to connect to and what to say in the request line and Host header."""

    scheme: str
    host: str  # as resolved and as checked against a TLS certificate (IDNA-encoded, no brackets)
    port: int
    path: str  # path and query
    host_header: str
    authorization: str | None  # Basic credentials from ``user:password@`` in the URL


def parse(url: str) -> Target:
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise Refused(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused("must be an http:// or https:// URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise Refused("has no host")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise Refused(f"has a host name that is not valid: {parts.hostname!r}") from None
    port = port or (443 if scheme == "https" else 80)
    default_port = port == (443 if scheme == "https" else 80)
    bracketed = f"[{host}]" if ":" in host else host
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(credentials).decode()
    return Target(
        scheme=scheme,
        host=host,
        port=port,
        path=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
        host_header=bracketed if default_port else f"{bracketed}:{port}",
        authorization=authorization,
    )


def literal_address(host: str) -> IPAddress | None:
    """The address a host names by itself, in any spelling a resolver accepts; ``None`` for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise Refused(f"has a numeric host that is not a valid IPv4 address: {host!r}") from None
    return None


def forbidden(address: IPAddress) -> str | None:
    """Why webhooks may not go to this address (``"a loopback address"``, …), or ``None`` if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one reaches that IPv4 address: judge that one.
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = forbidden(embedded)
            return f"{reason} (IPv4 {embedded} inside IPv6)" if reason else None
    for reason, test in (
        ("an unspecified address", address.is_unspecified),
        ("a loopback address", address.is_loopback),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a reserved address", address.is_reserved),
        ("a private address", address.is_private),
    ):
        if test:
            return reason
    if not address.is_global:
        return "not a publicly routable address"
    return None


def check_url(url: str, allow_private: bool) -> Target:
    """What can be refused from the URL alone (at submit); raises ``Refused``."""
    target = parse(url)
    if allow_private:
        return target
    host = target.host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        raise Refused(f"names {target.host}, a loopback host; webhooks may only go to public addresses")
    address = literal_address(target.host)
    if address is not None:
        reason = forbidden(address)
        if reason:
            raise Refused(f"names {address}, {reason}; webhooks may only go to public addresses")
    return target


def resolve(target: Target, allow_private: bool) -> list[str]:
    """The host's addresses (at send time), every one of them checked; raises ``Refused`` or ``Unresolvable``."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise Unresolvable(f"could not resolve {target.host}: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise Unresolvable(f"{target.host} has no address")
    if not allow_private:
        for found in addresses:
            reason = forbidden(ipaddress.ip_address(found.split("%", 1)[0]))
            if reason:
                raise Refused(f"{target.host} resolves to {found}, {reason}; webhooks may only go to public addresses")
    return addresses
