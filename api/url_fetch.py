"""Fetch an input image from a URL through the webhooks' SSRF guard, bounded in size, time and redirects.

Every hop (the URL and each redirect's target) is parsed and checked by ``worker.webhooks.guard``
(scheme, a literal non-public address in any spelling, ``localhost``), its host resolved, and every
address it resolves to checked; the request then goes to a checked address, with the URL's host
name for ``Host``, TLS SNI and certificate verification (``worker.webhooks.pinned``, which the
webhook sender uses too), so a DNS answer that changes in between cannot point it elsewhere.
Redirects are followed by hand, at most ``max_redirects``, each target checked again. The body is
read up to ``max_bytes`` (a ``Content-Length`` over it is refused before reading) and the server's
``Content-Type`` is ignored: the caller runs the image check on the bytes.

Time: one deadline covers everything (connecting, TLS, headers, redirects, the whole body). Per-read
timeouts alone would let a server that sends a byte a second hold a request for hours, so a timer
(``pinned.Watch``) shuts down the connection's socket when the deadline passes, which ends whatever
read is blocked. Under ``gpujobs api``'s gevent workers the standard library is monkey-patched, so
the sockets, ``getaddrinfo`` and the timer all yield to other greenlets while they wait; under
gthread the fetch holds only its own request's thread.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from urllib3.exceptions import HTTPError, SSLError

from worker.webhooks import guard, pinned

USER_AGENT = "gpujobs-inputs/1"
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
MAX_URL_CHARS = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchError(Exception):
    """The URL gave no usable image; the message completes "the field …" in words a client can act on."""


@dataclass(frozen=True)
class Policy:
    """What the operator allows (``GPUJOBS_INPUT_URL_*``)."""

    allow_http: bool
    allow_private: bool
    allowed_networks: tuple[Network, ...]
    max_bytes: int
    max_redirects: int
    timeout: float  # the deadline's length, for the message

    def refusal(self, address: guard.IPAddress) -> str | None:
        """Why input URLs may not reach ``address`` (None: they may)."""
        if self.allow_private or any(address in network for network in self.allowed_networks):
            return None
        return guard.forbidden(address)


@dataclass(frozen=True)
class Fetched:
    data: bytes
    url: str  # the last hop's URL (after redirects): its path names the stored file


def fetch(url: str, policy: Policy, deadline: float) -> Fetched:
    """The body of a 2xx answer to ``GET url`` (after redirects); raises ``FetchError``."""
    if len(url) > MAX_URL_CHARS:
        raise FetchError(f"is a URL of {len(url)} characters, more than {MAX_URL_CHARS}")
    current = url
    for hop in range(policy.max_redirects + 1):
        where = "" if hop == 0 else f"redirects to {current}, which "
        target = _check(current, policy, where)
        addresses = _resolve(target, policy, where)
        status, location, data = _get(target, addresses, policy, deadline)
        if status in REDIRECTS:
            if not location:
                raise FetchError(f"{where}answered HTTP {status} (a redirect) without a Location")
            try:
                current = urljoin(current, location.strip())
            except ValueError:
                raise FetchError(f"{where}redirects to {location!r}, which is not a URL") from None
            continue
        if not 200 <= status < 300:
            raise FetchError(f"{where}answered HTTP {status}, not an image; check that the URL is right and public")
        return Fetched(data=data, url=current)
    raise FetchError(f"redirected more than {policy.max_redirects} times (the limit); give the image's final URL")


def _check(url: str, policy: Policy, where: str) -> guard.Target:
    """What the URL alone shows (scheme, credentials, a literal non-public address, ``localhost``)."""
    try:
        target = guard.parse(url)
        literal = guard.literal_address(target.host)
    except guard.Refused as exc:
        raise FetchError(f"{where}{exc}") from None
    if target.scheme == "http" and not policy.allow_http:
        raise FetchError(
            f"{where}is an http:// URL; only https:// URLs are fetched (an operator may allow http:// with "
            "GPUJOBS_INPUT_URL_ALLOW_HTTP)"
        )
    if target.authorization is not None:
        raise FetchError(f"{where}has a user name or password in it; give a URL that needs none (e.g. presigned)")
    host = target.host.lower()
    if not policy.allow_private and (host == "localhost" or host.endswith(".localhost")):
        raise FetchError(f"{where}names {target.host}, a loopback host; {_PUBLIC_ONLY}")
    if literal is not None:
        reason = policy.refusal(literal)
        if reason:
            raise FetchError(f"{where}names {literal}, {reason}; {_PUBLIC_ONLY}")
    return target


_PUBLIC_ONLY = "input URLs may only reach public addresses"


def _resolve(target: guard.Target, policy: Policy, where: str) -> list[str]:
    """The host's addresses, every one checked: one refused address refuses the URL (no partial trust)."""
    try:
        addresses = guard.resolve(target, allow_private=True)  # the checks are this policy's, below
    except guard.Unresolvable as exc:
        raise FetchError(f"{where}could not be reached: {exc}") from None
    for found in addresses:
        reason = policy.refusal(ipaddress.ip_address(found.split("%", 1)[0]))
        if reason:
            raise FetchError(f"{where}has a host, {target.host}, that resolves to {found}, {reason}; {_PUBLIC_ONLY}")
    return addresses


def _get(target: guard.Target, addresses: list[str], policy: Policy, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET to the first address that connects: its status, ``Location`` and (for a 2xx) bounded body."""
    # identity: the bytes as they are (decoding is bounded by the reads anyway, and images do not compress).
    headers = {"Host": target.host_header, "User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"}
    failures: list[tuple[str, BaseException]] = []
    with pinned.Watch(deadline) as watch:

        def read(response: Any) -> tuple[int, str | None, bytes]:
            location = response.headers.get("Location")
            if response.status in REDIRECTS or not 200 <= response.status < 300:
                return response.status, location, b""
            return response.status, location, _body(response, policy, deadline, watch)

        try:
            return pinned.request("GET", target, addresses, headers=headers, deadline=deadline, read=read, watch=watch)
        except pinned.Unreachable as exc:
            failures = exc.failures
        except SSLError as exc:
            if not watch.expired:
                raise FetchError(f"could not be fetched: TLS failed ({pinned.reason(exc)})") from None
        except (HTTPError, OSError, ValueError) as exc:  # ValueError: http.client's InvalidURL, say
            if not (watch.expired or time.monotonic() >= deadline):
                raise FetchError(f"could not be fetched: {pinned.reason(exc)}") from None
    if failures and time.monotonic() < deadline:
        tried = "; ".join(f"{address}: {pinned.reason(exc)}" for address, exc in failures)
        raise FetchError(f"could not be fetched: no connection to {target.host} port {target.port} ({tried})")
    raise FetchError(
        f"took longer than {policy.timeout:g} s to fetch (the limit for a submit's input URLs); give a faster URL"
    )


def _body(response: Any, policy: Policy, deadline: float, watch: pinned.Watch) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > policy.max_bytes:
        raise FetchError(f"is {int(declared)} bytes (its Content-Length), more than the limit of {policy.max_bytes}")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = response.read(CHUNK, decode_content=True)
        if watch.expired or time.monotonic() >= deadline:
            raise TimeoutError  # turned into the deadline's message by ``_get``
        if not chunk:
            break
        size += len(chunk)
        if size > policy.max_bytes:
            raise FetchError(f"is more than the limit of {policy.max_bytes} bytes (reading stopped there)")
        chunks.append(chunk)
    if not size:
        raise FetchError("answered with an empty body, not an image")
    return b"".join(chunks)
