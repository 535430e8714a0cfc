"""Real backing services for the tests: a fresh database, a Redis database of our own, S3.

PostgreSQL is used when it answers on 127.0.0.1:5432 (a fresh ``gpujobs_test_<random>``
database, dropped at the end); otherwise a SQLite file. Redis is the machine's server on
127.0.0.1:6379 when it answers (an empty database index, claimed so that parallel test runs
never share a queue), otherwise an embedded one. S3 is always an embedded SeaweedFS.

``GPUJOBS_TEST_EMBEDDED=1`` makes a run behave as on a bare machine (SQLite and an embedded
Redis) even where PostgreSQL and Redis answer; ``GPUJOBS_TEST_DATABASE_URL`` names a database.
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

PG_HOST = "127.0.0.1"
PG_PORT = 5432
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_OWNER_KEY = "gpujobs:test:owner"


def _answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- PostgreSQL ------------------------------------------------------------------------------------


def embedded_only() -> bool:
    return os.environ.get("GPUJOBS_TEST_EMBEDDED", "").lower() in ("1", "true", "yes")


def _pg_user() -> str:
    return os.environ.get("PGUSER", "postgres")


def postgres_maintenance_conninfo() -> str | None:
    """A libpq conninfo for a database we can run CREATE DATABASE from, or None when PostgreSQL is not here."""
    if not _answers(PG_HOST, PG_PORT):
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
        return (
            f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT} for user {_pg_user()!r} "
            "(set PGUSER, or GPUJOBS_TEST_DATABASE_URL)"
        )
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_postgres_database() -> str:
    """Create an empty database ``gpujobs_test_<pid>_<random>``; returns its SQLAlchemy URL.

    Databases left by test runs that were killed (their pid is gone) are dropped on the way.
    """
    conninfo = postgres_maintenance_conninfo()
    if conninfo is None:
        raise RuntimeError(postgres_unavailable_reason())
    name = f"gpujobs_test_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        existing = [
            row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'gpujobs_test_%'")
        ]
        for stale in existing:
            match = re.fullmatch(r"gpujobs_test_(\d+)_[0-9a-f]+", stale)
            if match and not _pid_alive(int(match.group(1))):
                conn.execute(f'DROP DATABASE IF EXISTS "{stale}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://{_pg_user()}@{PG_HOST}:{PG_PORT}/{name}"


def drop_postgres_database(url: str) -> None:
    conninfo = postgres_maintenance_conninfo()
    if conninfo is None:
        return
    name = url.rsplit("/", 1)[1]
    assert name.startswith("gpujobs_test_"), name  # never drop a database the tests did not create
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sqlite_url(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'gpujobs.db'}"


@dataclass
class Database:
    url: str
    owned_postgres: bool  # created by the tests, so dropped by them

    @property
    def is_postgres(self) -> bool:
        return self.url.startswith("postgresql")

    def drop(self) -> None:
        from db.session import dispose_engines

        if self.owned_postgres:
            dispose_engines()
            drop_postgres_database(self.url)


def provision_database(tmp_dir: Path) -> Database:
    """GPUJOBS_TEST_DATABASE_URL if set, else a fresh PostgreSQL database, else SQLite; migrated to head."""
    import migrations

    given = os.environ.get("GPUJOBS_TEST_DATABASE_URL")
    if given:
        database = Database(given, owned_postgres=False)
    elif not embedded_only() and postgres_maintenance_conninfo() is not None:
        database = Database(create_postgres_database(), owned_postgres=True)
    else:
        database = Database(sqlite_url(tmp_dir), owned_postgres=False)
    migrations.upgrade(database.url)
    return database


# --- Redis -----------------------------------------------------------------------------------------


@dataclass
class RedisDatabase:
    url: str
    embedded: object | None  # gpujobs.embedded.EmbeddedRedis when we started one

    def release(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()  # type: ignore[attr-defined]
            return
        client = redis.Redis.from_url(self.url)
        try:
            client.flushdb()
        finally:
            client.close()


def _owner_is_gone(owner: bytes | None) -> bool:
    """True when ``owner`` names a test session of this host whose process no longer exists."""
    if owner is None:
        return False
    host, _, rest = owner.decode(errors="replace").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _claim_index(client: redis.Redis, me: str) -> bool:
    """Claim this database index: empty and unowned, or owned by a test session that died."""
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
            return False  # another session reclaimed it first
    # Drop what the dead run left, but never the claim (a FLUSHDB would let a third run in).
    for key in client.scan_iter(count=1000):
        if key != REDIS_OWNER_KEY.encode():
            client.unlink(key)
    return True


def provision_redis(tmp_dir: Path) -> RedisDatabase:
    """A database index of the machine's Redis of our own (claimed with a key), else an embedded Redis."""
    if not embedded_only() and _answers(REDIS_HOST, REDIS_PORT):
        me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        for index in range(15, 0, -1):
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=index, socket_timeout=3)
            try:
                # Parallel test runs (and their workers) never share a queue or a key.
                if _claim_index(client, me):
                    return RedisDatabase(f"redis://{REDIS_HOST}:{REDIS_PORT}/{index}", embedded=None)
            except redis.RedisError:
                break
            finally:
                client.close()
    from gpujobs.embedded import start_redis

    server = start_redis(tmp_dir / "redis")
    return RedisDatabase(server.url, embedded=server)
