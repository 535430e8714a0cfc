"""A real HTTP server in the test process that receives webhooks and answers as a test scripts it."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.integration.http_server import QuietHandler, ThreadedServer


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() when the body was read
    wall: float = 0.0  # time.time() then (to compare with the API's timestamps)

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    hang: bool = False  # never answer (until the receiver stops)
    delay: float = 0.0  # seconds to wait before answering


class Receiver(ThreadedServer):
    """Listens on ``host`` (loopback by default; HTTPS with ``tls``); ``script(path, replies)`` sets a path's answers.

    A path answers its replies one after another and repeats the last one; a path without a
    script answers 200.
    """

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.received: list[Received] = []
        self.in_flight: dict[str, int] = {}  # requests being answered now, per path
        self.most_in_flight: dict[str, int] = {}  # the most at once, per path
        self._scripts: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                reply = receiver._record(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                try:
                    self._answer(reply)
                finally:
                    with receiver._lock:
                        receiver.in_flight[self.path] -= 1

            def _answer(self, reply: Reply) -> None:
                if reply.hang:
                    receiver._stopping.wait(120)
                    return
                if reply.delay:
                    receiver._stopping.wait(reply.delay)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST

        super().__init__(Handler, host, tls, "webhook-receiver")

    def url(self, path: str = "/hook", host: str | None = None) -> str:
        return super().url(path, host)

    def script(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts[path] = list(replies)

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        with self._changed:
            self.received.append(Received(path, headers, body, time.monotonic(), time.time()))
            self.in_flight[path] = now = self.in_flight.get(path, 0) + 1
            self.most_in_flight[path] = max(self.most_in_flight.get(path, 0), now)
            replies = self._scripts.get(path) or [Reply()]
            reply = replies.pop(0) if len(replies) > 1 else replies[0]
            self._changed.notify_all()
            return reply

    def at(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, path: str, until: Callable[[list[Received]], bool], timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [r for r in self.received if r.path == path]
                if until(found):
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{path} did not get what the test waited for in {timeout:g}s; got {found}")
                self._changed.wait(remaining)
