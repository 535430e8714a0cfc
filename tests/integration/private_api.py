"""A `gpujobs api` of its own: a private database and Redis, the session's S3 (its own bucket), no worker.

For tests that fill a database with jobs nobody should run (a wait flood, a fuzzer): the session's
workers never see them, and everything is dropped afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpujobs.harness.databases import provision_database, provision_redis
from gpujobs.harness.processes import ManagedProcess, Stack
from tests.integration.conftest import Key, embedded_only, make_key


@dataclass
class PrivateApi:
    base_url: str
    database_url: str
    redis_url: str
    process: ManagedProcess
    stack: Stack

    def key(self, name: str, role: str = "user", tenant: str | None = None) -> Key:
        return make_key(name, role, tenant=tenant, database_url=self.database_url)


@contextmanager
def private_api(
    directory: Path, settings: dict[str, str] | None = None, workers: int = 1, api_args: Sequence[str] = ()
) -> Iterator[PrivateApi]:
    """`gpujobs api` (gunicorn, gevent) on a migrated private database and Redis; ``settings``: GPUJOBS_* extras."""
    import migrations

    database = provision_database(directory / "db", postgres=not embedded_only(), purpose="private")
    redis_db = stack = None
    try:
        migrations.upgrade(database.url)
        redis_db = provision_redis(directory, machine=not embedded_only())
        env = {
            **os.environ,
            "GPUJOBS_DATABASE_URL": database.url,
            "GPUJOBS_BROKER_URL": redis_db.url,
            "GPUJOBS_VAR_DIR": str(directory / "var"),
            **(settings or {}),
        }
        stack = Stack(env, directory / "logs", label=directory.name[:20])
        process, base_url = stack.start_api(workers=workers, extra_args=api_args)
        yield PrivateApi(base_url, database.url, redis_db.url, process, stack)
    finally:
        if stack is not None:
            stack.stop_all()
        if redis_db is not None:
            redis_db.release()
        database.drop()
