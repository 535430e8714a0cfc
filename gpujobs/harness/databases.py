"""Databases of a stack of one's own: a fresh PostgreSQL database, else SQLite; a Redis database index.

PostgreSQL is used when it answers on 127.0.0.1:5432 (user ``$PGUSER``, default ``postgres``):
a fresh ``gpujobs_<purpose>_<pid>_<random>`` database, dropped at the end; databases of that
form whose process is gone (a run that was killed) are dropped on the way. Redis is the
machine's server on 127.0.0.1:6379 when it answers (an empty database index, claimed so that
parallel runs never share a queue), otherwise an embedded one.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from gpujobs.harness.servers import EmbeddedRedis, redis_answers, start_redis

PG_HOST = "127.0.0.1"
PG_PORT = 5432
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_OWNER_KEY = "gpujobs:test:owner"
# The names this module gives the databases it creates, and the only ones it ever drops.
PROVISIONED = re.compile(r"gpujobs_[a-z]+_(\d+)_[0-9a-f]+")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- PostgreSQL ------------------------------------------------------------------------------------


def _pg_user() -> str:
    return os.environ.get("PGUSER", "postgres")


def postgres_maintenance_conninfo() -> str | None:
    """A libpq conninfo for a database we can run CREATE DATABASE from, or None when PostgreSQL is not here."""
    try:
        socket.create_connection((PG_HOST, PG_PORT), timeout=0.5).close()
    except OSError:
        return None
    for dbname in ("postgres", "test"):
        conninfo = f"host={PG_HOST} port={PG_PORT} user={_pg_user()} dbname={dbname} connect_timeout=3"
        try:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return conninfo
        except psycopg.Error:
            continue
    return None


def postgres_unavailable_reason() -> str | None:
    if postgres_maintenance_conninfo() is None:
        return f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT} for user {_pg_user()!r} (set PGUSER)"
    return None


def create_postgres_database(purpose: str = "test") -> str:
    """Create an empty database ``gpujobs_<purpose>_<pid>_<random>``; returns its SQLAlchemy URL.

    Databases left by runs that were killed (their pid is gone) are dropped on the way.
    """
    conninfo = postgres_maintenance_conninfo()
    if conninfo is None:
        raise RuntimeError(postgres_unavailable_reason())
    name = f"gpujobs_{purpose}_{os.getpid()}_{secrets.token_hex(4)}"
    assert PROVISIONED.fullmatch(name), name
    with psycopg.connect(conninfo, autocommit=True) as conn:
        existing = [row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'gpujobs_%'")]
        for stale in existing:
            match = PROVISIONED.fullmatch(stale)
            if match and not _pid_alive(int(match.group(1))):
                conn.execute(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://{_pg_user()}@{PG_HOST}:{PG_PORT}/{name}"


def drop_postgres_database(url: str) -> None:
    conninfo = postgres_maintenance_conninfo()
    if conninfo is None:
        return
    name = url.rsplit("/", 1)[1]
    assert PROVISIONED.fullmatch(name), name  # never drop a database this module did not create
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_url(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'gpujobs.db'}"


@dataclass
class Database:
    url: str
    owned_postgres: bool  # created here, so dropped by drop()

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith("postgresql")

    def drop(self) -> None:
        """Close this process's connections, then drop the database if it was created here."""
        from db.session import dispose_engines

        dispose_engines()
        if self.owned_postgres:
            drop_postgres_database(self.url)


def provision_database(
    directory: Path, url: str | None = None, postgres: bool = True, purpose: str = "test"
) -> Database:
    """``url`` if given, else a fresh PostgreSQL database (when ``postgres`` and one answers), else SQLite
    in ``directory``; not migrated."""
    if url:
        return Database(url, owned_postgres=False)
    if postgres and postgres_maintenance_conninfo() is not None:
        return Database(create_postgres_database(purpose), owned_postgres=True)
    return Database(sqlite_url(directory), owned_postgres=False)


# --- Redis -----------------------------------------------------------------------------------------


@dataclass
class RedisDatabase:
    url: str
    embedded: EmbeddedRedis | None  # when we started one

    def release(self) -> None:
        """Stop the embedded server, or empty the claimed index (the claim included)."""
        if self.embedded is not None:
            self.embedded.stop()
            return
        client = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)
        try:
            client.flushdb()
        finally:
            client.close()


def _owner_is_gone(owner: bytes | None) -> bool:
    """True when ``owner`` names a run of this host whose process no longer exists."""
    if owner is None:
        return False
    host, _, rest = owner.decode(errors="replace").partition(":")
    pid = rest.partition(":")[0]
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def _claim_index(client: redis.Redis, me: str) -> bool:
    """Claim this database index: empty and unowned, or owned by a run that died."""
    if client.dbsize() == 0:
        return bool(client.set(REDIS_OWNER_KEY, me, nx=True))
    with client.pipeline() as pipe:
        try:
            pipe.watch(REDIS_OWNER_KEY)
            owner = pipe.get(REDIS_OWNER_KEY)
            if not _owner_is_gone(owner):
                return False  # someone else's data, or a live run
            pipe.multi()
            pipe.set(REDIS_OWNER_KEY, me)
            pipe.execute()
        except redis.WatchError:
            return False  # another run reclaimed it first
    # Drop what the dead run left, but never the claim (a FLUSHDB would let a third run in).
    for key in client.scan_iter(count=1000):
        if key != REDIS_OWNER_KEY.encode():
            client.unlink(key)
    return True


def provision_redis(directory: Path, machine: bool = True) -> RedisDatabase:
    """A database index of the machine's Redis of our own (claimed with a key, when ``machine`` and it
    answers), else an embedded Redis with its data in ``directory``."""
    if machine and redis_answers(REDIS_PORT, REDIS_HOST):
        me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        for index in range(15, 0, -1):
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=index, socket_connect_timeout=2, socket_timeout=3)
            try:
                # Parallel runs (and their workers) never share a queue or a key.
                if _claim_index(client, me):
                    return RedisDatabase(f"redis://{REDIS_HOST}:{REDIS_PORT}/{index}", embedded=None)
            except redis.RedisError:
                break
            finally:
                client.close()
    server = start_redis(directory / "redis")
    return RedisDatabase(server.url, embedded=server)
