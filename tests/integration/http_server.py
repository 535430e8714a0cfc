"""The scaffolding the tests' own HTTP(S) servers share (``image_server``, ``webhook_receiver``).

A ``ThreadingHTTPServer`` on a free port of ``host`` (IPv6 when the host is an IPv6 address; HTTPS
with ``tls``), served on a daemon thread from construction until ``stop()``. ``stop()`` also sets
``_stopping``, which a handler that holds a request open waits on, so it ends at once.
"""

from __future__ import annotations

import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1, and nothing written to stderr for each request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class ThreadedServer:
    """Serves ``handler`` on ``host`` (a free port) on a thread named ``name``; a subclass sets its own state first."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str, tls: ssl.SSLContext | None, name: str) -> None:
        self._stopping = threading.Event()
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        self.server = server_class((host, 0), handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.host = host
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name=name, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str | None = None) -> str:
        host = host or self.host
        shown = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{shown}:{self.port}{path}"

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()
