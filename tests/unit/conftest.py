"""Fixtures of the unit layer: no services, no subprocesses, no network beyond loopback.

The database is real: a SQLite file made by the project's Alembic migrations (once per run,
then copied for each test that asks for one), opened through ``db.session`` like the
service opens it (WAL, busy timeout, foreign keys).

Nothing here may leave the process changed for whatever runs next in it (``make test`` runs
this layer and then ``tests/integration`` in one pytest process): every ``GPUJOBS_*`` variable
is cleared around each test and the cached settings, engines and Redis clients are dropped.
Importing ``api`` or ``worker`` builds and connects nothing, so tests import them freely.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from db import notify
from db.session import dispose_engines, session_factory
from db.settings import reset_settings


def _reset_process_caches() -> None:
    reset_settings()
    notify.reset_clients()
    dispose_engines()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from the built-in defaults: no GPUJOBS_* variable of the caller's shell leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("GPUJOBS_"):
            monkeypatch.delenv(name)
    _reset_process_caches()
    yield
    _reset_process_caches()


# --- the database -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file at ``alembic upgrade head``, made once; tests get copies of it."""
    import migrations

    path = tmp_path_factory.mktemp("schema") / "gpujobs.db"
    migrations.upgrade(f"sqlite:///{path}")
    dispose_engines()  # the last connection closes: the WAL is checkpointed into the file
    assert not path.with_name(path.name + "-wal").exists()
    return path


@pytest.fixture
def database_url(migrated_database: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh migrated SQLite database of this test's own, also the process's ``GPUJOBS_DATABASE_URL``.

    The broker is set to ``memory://`` so that nothing in the process looks for Redis (finish
    notifications are skipped when no Redis is configured, as in a deployment without one).
    """
    path = tmp_path / "gpujobs.db"
    shutil.copyfile(migrated_database, path)
    url = f"sqlite:///{path}"
    monkeypatch.setenv("GPUJOBS_DATABASE_URL", url)
    monkeypatch.setenv("GPUJOBS_BROKER_URL", "memory://")
    _reset_process_caches()
    return url


@pytest.fixture
def sessions(database_url: str):  # type: ignore[no-untyped-def]
    """The service's session factory for this test's database: each call opens a session (a connection)."""
    return session_factory(database_url)
