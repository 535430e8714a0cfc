"""A PostgreSQL server of a test's own, which it may freeze (SIGSTOP) and kill (SIGKILL).

The machine's shared PostgreSQL (5432) and Redis (6379) are never signalled: fault tests start
their own servers here (PostgreSQL) and with ``gpujobs.harness.servers`` (Redis, S3). The server
runs ``postgres`` from ``/usr/lib/postgresql/<version>/bin`` on a free loopback port, trust
authentication, no unix socket, its data in a temporary directory; as root it runs as the
``postgres`` user (PostgreSQL refuses to run as root). The multi-host tests run it on another
address (``host``) in a network namespace (``wrap``: ``ip netns exec <namespace>``) and trust the
clients of their private subnet (``clients``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg

from gpujobs.harness.ports import free_port
from gpujobs.harness.processes import LOOPBACK, log_tail, signal_group, start_process

START_TIMEOUT = 30.0


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding initdb and postgres, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """``postgres`` on 127.0.0.1:<port> (or ``host``) with one database, ``gpujobs``."""

    def __init__(self, bin_dir: Path, root: Path, port: int, host: str = LOOPBACK, wrap: Sequence[str] = ()) -> None:
        self.bin_dir = bin_dir
        self.root = root  # removed by close()
        self.data_dir = root / "data"
        self.log_path = root / "postgres.log"
        self.port = port
        self.host = host
        self.wrap = list(wrap)
        self.url = f"postgresql://postgres@{host}:{port}/gpujobs"
        self.process: subprocess.Popen | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, host: str = LOOPBACK, wrap: Sequence[str] = (), clients: Sequence[str] = ()) -> PrivatePostgres:
        """Initialise and start a cluster on ``host`` (run through ``wrap``), trusting loopback and the
        ``clients`` networks (CIDR)."""
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        # Not under pytest's tmp dir: as root that is mode 0700, which the postgres user cannot enter.
        root = Path(tempfile.mkdtemp(prefix="gpujobs-private-pg-"))
        server = cls(bin_dir, root, free_port(), host, wrap)
        try:
            server._chown(root)
            server._run([str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", "postgres", "-A", "trust"])
            with open(server.data_dir / "pg_hba.conf", "a") as hba:
                hba.writelines(f"host all all {network} trust\n" for network in clients)
            server.start()
            with psycopg.connect(server.conninfo("postgres"), autocommit=True) as conn:
                conn.execute("CREATE DATABASE gpujobs")
        except BaseException:
            server.close()
            raise
        return server

    def start(self) -> None:
        """Start (or start again, on the same data and port) and wait until it accepts connections."""
        args = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            "unix_socket_directories=",
            "-c",
            "fsync=off",  # a killed server's writes are still in the page cache: nothing is lost
            "-c",
            "max_connections=200",
        ]
        # The namespace is entered as root, then setpriv drops to the postgres user.
        self.process = start_process([*self.wrap, *self._as_postgres(args)], self.log_path)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with psycopg.connect(self.conninfo("postgres")) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"private PostgreSQL did not start on port {self.port}:\n{log_tail(self.log_path)}"
                    ) from None
                time.sleep(0.05)

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.conninfo("postgres")) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def freeze(self) -> None:
        """SIGSTOP every process of the server (postmaster and backends): it accepts TCP, answers nothing."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL every process of the server (a crash); ``start()`` recovers it from its WAL."""
        assert self.process is not None
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGINT)  # fast shutdown: ends the sessions instead of waiting for them
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.process.wait(10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- helpers -----------------------------------------------------------------------------------

    def conninfo(self, dbname: str = "gpujobs") -> str:
        return f"host={self.host} port={self.port} user=postgres dbname={dbname} connect_timeout=2"

    def _signal(self, sig: int) -> None:
        """``sig`` to the postmaster and every process it forked (each backend leads a process group
        of its own, so signalling the postmaster's group is not enough)."""
        if self.process is None:
            return
        signal_group(self.process, sig)
        for pid in descendants(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    @staticmethod
    def _postgres_user() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        return pwd.getpwnam("postgres")

    def _chown(self, path: Path) -> None:
        user = self._postgres_user()
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _as_postgres(self, args: list[str]) -> list[str]:
        if self._postgres_user() is None:
            return args
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *args]

    def _run(self, args: list[str]) -> None:
        result = subprocess.run(self._as_postgres(args), capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, their children…), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
