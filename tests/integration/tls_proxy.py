"""A TLS-terminating TCP proxy on loopback, with a throwaway CA (trustme).

The ``replicate`` client turns only ``https:`` (and ``data:``) output URLs into ``FileOutput``s, so the
Replicate tests give the API a public S3 URL behind this proxy. It forwards bytes unchanged (the Host
header a presigned URL was signed for arrives as signed) to the test S3 server.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

import trustme


class TlsProxy:
    def __init__(self, target: tuple[str, int], folder: Path) -> None:
        self.target = target
        self.ca = trustme.CA()
        self.ca_file = folder / "proxy-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ca.issue_cert("127.0.0.1").configure_cert(server)
        self.listener = server.wrap_socket(socket.create_server(("127.0.0.1", 0)), server_side=True)
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, name="tls-proxy", daemon=True).start()

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, ssl.SSLError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.target, timeout=30) as upstream:
            conn.settimeout(30)
            done = threading.Event()

            def pipe(source: socket.socket, sink: socket.socket) -> None:
                with contextlib.suppress(OSError):
                    while chunk := source.recv(65536):
                        sink.sendall(chunk)
                done.set()

            threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
            pipe(conn, upstream)
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)
            done.wait(30)

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
