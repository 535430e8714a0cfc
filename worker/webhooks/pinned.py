"""One HTTP request to addresses the SSRF guard checked, pinned: what webhooks and input URLs share.

The caller resolves the URL's host and checks every address (``guard``, or ``api.url_fetch``'s own
policy); ``request`` then connects to those addresses in turn, never to the name, while the URL's
host name goes in the ``Host`` header, TLS SNI and certificate verification, so a DNS answer that
changes in between cannot point the request elsewhere. It follows no redirect (a caller that
follows them checks each target itself and calls again), retries nothing, uses no environment
proxy, and tries the next address only when this one could not be reached at all.

Time: each connection's connect and read timeouts are what is left of the caller's deadline when it
is opened. With a ``Watch`` (input URLs have one; webhooks bound their reads themselves) the
deadline also bounds the whole exchange, a body sent a byte at a time included: the watch shuts
down the connection's socket when the deadline passes, which ends whatever read is blocked.

What counts as an answer (``read``, while the response is open) and what an error means (a
refusal, a retry) stay with the callers: ``request`` raises ``Unreachable`` when no address took
the connection, and lets urllib3's and ``read``'s own exceptions through.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from worker.webhooks.guard import Target

T = TypeVar("T")


class Unreachable(Exception):
    """No address took the connection; ``failures`` says why for each one tried (none: no time was left)."""

    def __init__(self, failures: list[tuple[str, BaseException]]) -> None:
        super().__init__("; ".join(f"{address}: {reason(exc)}" for address, exc in failures) or "no time left")
        self.failures = failures


def request(
    method: str,
    target: Target,
    addresses: list[str],
    *,
    headers: dict[str, str],
    deadline: float,
    read: Callable[[urllib3.BaseHTTPResponse], T],
    body: bytes | None = None,
    watch: Watch | None = None,
) -> T:
    """``read`` of the answer to one request, from the first of ``addresses`` that connects before ``deadline``."""
    failures: list[tuple[str, BaseException]] = []
    for address in addresses:  # the next address only when this one cannot be reached at all
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        connections = pool(target, address, remaining, watch)
        try:
            response = connections.urlopen(
                method,
                target.path,
                body=body,
                headers=headers,
                redirect=False,
                retries=False,
                assert_same_host=False,
                preload_content=False,
            )
            try:
                return read(response)
            finally:
                response.release_conn()
        except (NewConnectionError, ConnectTimeoutError) as exc:
            if watch is not None and watch.expired:
                break
            failures.append((address, exc))
            continue
        finally:
            connections.close()
    raise Unreachable(failures)


def pool(target: Target, address: str, timeout: float, watch: Watch | None = None) -> urllib3.HTTPConnectionPool:
    """A one-connection pool to ``address`` that speaks to ``target``'s host (``Host``, SNI, certificate)."""
    limits = urllib3.Timeout(connect=timeout, read=timeout)
    watched: dict[str, Any] = {} if watch is None else {"watch": watch}
    connections: urllib3.HTTPConnectionPool
    if target.scheme == "https":
        connections = urllib3.HTTPSConnectionPool(
            address,
            target.port,
            timeout=limits,
            retries=False,
            maxsize=1,
            cert_reqs="CERT_REQUIRED",
            server_hostname=target.host,
            assert_hostname=target.host,
            **watched,
        )
        if watch is not None:
            connections.ConnectionCls = _WatchedHTTPSConnection
    else:
        connections = urllib3.HTTPConnectionPool(
            address, target.port, timeout=limits, retries=False, maxsize=1, **watched
        )
        if watch is not None:
            connections.ConnectionCls = _WatchedHTTPConnection
    return connections


def reason(exc: BaseException) -> str:
    """The cause in plain words (``connection refused``), without urllib3's connection repr."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror[:1].lower() + cause.strerror[1:]
    if isinstance(exc, ConnectTimeoutError):
        return "timed out"
    return str(cause or exc)


@dataclass
class Watch:
    """Shuts down every socket it was given when the deadline passes, which ends a blocked read at once.

    It holds a duplicate of each socket's descriptor: shutting that down shuts down the one connection
    (also under TLS, whose wrapper took over the original socket object)."""

    deadline: float
    expired: bool = False
    _sockets: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _timer: threading.Timer | None = None

    def __enter__(self) -> Watch:
        self._timer = threading.Timer(max(self.deadline - time.monotonic(), 0.0), self._cut)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            copy = sock.dup()
            self._sockets.append(copy)
            if self.expired:
                _shutdown(copy)

    def _cut(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by its reader
        sock.shutdown(socket.SHUT_RDWR)


class _WatchedHTTPConnection(HTTPConnection):
    """A connection whose socket the deadline's watch can shut (HTTPS is the same, below)."""

    def __init__(self, *args: Any, watch: Watch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watch = watch

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        self._watch.add(sock)
        return sock


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    pass
