"""Free TCP ports on loopback, picked at start so that several stacks on one machine (a test run
beside a running ``gpujobs up``, two benchmarks) never collide."""

from __future__ import annotations

import socket


def port_free(port: int) -> bool:
    """Nothing is bound to ``port`` on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
