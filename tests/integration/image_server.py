"""A real HTTP(S) server in the test process that serves input images, and misbehaves on request.

Paths: ``/img/<name>`` serves ``images[name]`` (with a ``Content-Type: image/png`` whatever the
bytes, so a test can show the header is ignored); ``/redirect?to=<url>`` answers 302 to ``url``;
``/loop`` redirects to itself; ``/slow`` sends its headers, then one byte a second (a slow-loris
body); ``/slow-headers`` sends its status line, then one header byte a second; ``/endless`` streams
bytes with no ``Content-Length`` until the client hangs up; ``/declared-huge`` declares a 10 GB
``Content-Length``; anything else is a 404. Each request's path is recorded, and ``sent[path]``
counts the body bytes written, so a test sees what was (not) read.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from urllib.parse import parse_qs, urlsplit

from tests.integration.http_server import QuietHandler, ThreadedServer

CHUNK = 64 * 1024


class ImageServer(ThreadedServer):
    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.images: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                with server._lock:
                    server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                with contextlib.suppress(OSError):  # the client hung up: what these tests provoke
                    self._answer(path)

            def _answer(self, path: str) -> None:
                if path.startswith("/img/") and path[5:] in server.images:
                    self._send(200, server.images[path[5:]], {"Content-Type": "image/png"})
                elif path == "/redirect":
                    [to] = parse_qs(urlsplit(self.path).query)["to"]
                    self._send(302, b"", {"Location": to})
                elif path == "/loop":
                    self._send(302, b"", {"Location": "/loop"})
                elif path == "/slow":
                    self._headers(200, {"Content-Length": "1000", "Content-Type": "image/png"})
                    for _ in range(1000):
                        if server._stopping.wait(1.0):
                            return
                        self._write(path, b"\x89")
                elif path == "/slow-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for _ in range(1000):
                        if server._stopping.wait(1.0):
                            return
                        self._write(path, b"X")
                elif path == "/endless":
                    self._headers(200, {"Content-Type": "image/png", "Connection": "close"})
                    while not server._stopping.is_set():
                        self._write(path, b"\0" * CHUNK)
                elif path == "/declared-huge":
                    self._headers(200, {"Content-Length": str(10**10), "Content-Type": "image/png"})
                    self._write(path, b"\0" * CHUNK)
                    server._stopping.wait(30)
                else:
                    self._send(404, b"not here", {"Content-Type": "text/plain"})

            def _headers(self, status: int, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self._headers(status, {**headers, "Content-Length": str(len(body)), "Connection": "close"})
                self._write(urlsplit(self.path).path, body)

            def _write(self, path: str, data: bytes) -> None:
                self.wfile.write(data)
                self.wfile.flush()
                with server._lock:
                    server.sent[path] = server.sent.get(path, 0) + len(data)

        super().__init__(Handler, host, tls, "image-server")

    def paths(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.requests]

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()
