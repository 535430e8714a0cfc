"""A TCP proxy on loopback in front of a real server that fails chosen answers once, for the client's tests.

Each rule is armed once and fires on the next request whose first line starts with its prefix:

- ``drop_answer``: the request reaches the API (so a submit is committed), then the connection is closed as
  its answer starts to come back: the client never sees it (an answer lost on the way);
- ``cut_stream``: the answer is passed on until it holds ``after`` (an event of the stream), then closed;
- ``refuse``: the proxy answers ``status`` with ``Retry-After`` itself;
  the request never reaches the API.

``close()`` cuts every connection and refuses new ones (a server gone). ``requests`` records each request
head that went through (method, path and headers), in order.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Rule:
    prefix: bytes
    action: str
    after: bytes = b""
    status: int = 503
    retry_after: int = 1


@dataclass
class FlakyProxy:
    upstream: tuple[str, int]
    rules: list[Rule] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, prefix: str, action: str, **options: object) -> None:
        with self.lock:
            self.rules.append(Rule(prefix.encode(), action, **options))  # type: ignore[arg-type]

    def close(self) -> None:
        """Refuse new connections and cut the open ones (as a server that went away)."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread: else the port stays open
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take(self, head: bytes) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if head.startswith(rule.prefix):
                    self.rules.remove(rule)
                    self.fired.append(f"{rule.action} {rule.prefix.decode()}")
                    return rule
        return None

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream, timeout=60)
        with self.lock:
            self.sockets += [client, upstream]
        state: dict[str, Rule | None] = {"rule": None}
        done = threading.Event()

        def close_both() -> None:
            done.set()
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

        def from_client() -> None:
            try:
                while not done.is_set():
                    data = client.recv(65536)
                    if not data:
                        break
                    if data[:8].split(b" ")[0] in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS"):
                        head = data.split(b"\r\n\r\n", 1)[0]
                        with self.lock:
                            self.requests.append(head.decode("latin-1"))
                        rule = self._take(head)
                        if rule is not None and rule.action == "refuse":
                            body = (
                                b'{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"injected"}'
                            )
                            client.sendall(
                                f"HTTP/1.1 {rule.status} Injected\r\nContent-Type: application/problem+json\r\n"
                                f"Retry-After: {rule.retry_after}\r\nContent-Length: {len(body)}\r\n"
                                "Connection: close\r\n\r\n".encode()
                                + body
                            )
                            break
                        state["rule"] = rule
                    upstream.sendall(data)
            except OSError:
                pass
            close_both()

        def from_upstream() -> None:
            seen = b""
            try:
                while not done.is_set():
                    data = upstream.recv(65536)
                    if not data:
                        break
                    rule = state["rule"]
                    if rule is not None and rule.action == "drop_answer":
                        break  # the API answered (so it committed); the client never hears it
                    client.sendall(data)
                    if rule is not None and rule.action == "cut_stream":
                        seen += data
                        if rule.after in seen:
                            break
            except OSError:
                pass
            close_both()

        threading.Thread(target=from_upstream, daemon=True).start()
        from_client()
