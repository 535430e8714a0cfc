"""Fixtures of the unit layer: no services, no subprocesses, no network beyond loopback.

The database is real: a SQLite file made by the project's Alembic migrations (once per run,
then copied for each test that asks for one), opened through ``db.session`` like the
service opens it (WAL, busy timeout, foreign keys).

Nothing here may leave the process changed for whatever runs next in it (``make test`` runs
this layer and then ``tests/integration`` in one pytest process): every ``GPUJOBS_*`` variable
is cleared around each test and the cached settings, engines and Redis clients are dropped;
``worker.celery_app``, which binds the broker of the environment it is first imported in, must
not stay imported (see ``forget_imports``).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Imported here, before any test, so that they are never "new" modules a test could drop:
# db.notify and db.webhooks register SQLAlchemy session listeners when imported.
from db import notify, webhooks
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


@pytest.fixture(scope="package", autouse=True)
def no_celery_app_left_behind() -> Iterator[None]:
    """The integration suite refuses to run in a process where ``worker.celery_app`` was already
    imported (it would hold the wrong broker); say so here, where the import happened."""
    before = "worker.celery_app" in sys.modules
    yield
    assert before or "worker.celery_app" not in sys.modules, (
        "a unit test left worker.celery_app imported: import api/worker.celery_app inside forget_imports()"
    )


@contextmanager
def forget_imports(*prefixes: str) -> Iterator[None]:
    """Drop, on exit, the modules under ``prefixes`` first imported inside the block (and the
    webhook callbacks they registered), so the next import makes them afresh.

    ``import api`` imports ``worker.celery_app``, which builds its Celery app from the settings
    in effect then and registers a webhook callback on ``db.webhooks``.
    """
    modules_before = set(sys.modules)
    callbacks_before = list(webhooks._after_commit_callbacks)
    try:
        yield
    finally:
        webhooks._after_commit_callbacks[:] = callbacks_before
        new = [
            name
            for name in set(sys.modules) - modules_before
            if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)
        ]
        for name in sorted(new, key=lambda n: -n.count(".")):
            del sys.modules[name]
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and getattr(sys.modules[parent], child, None) is not None:
                delattr(sys.modules[parent], child)


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
