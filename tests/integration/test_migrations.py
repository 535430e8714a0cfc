"""The schema exists only through migrations: `upgrade head` gives exactly the models, `downgrade base` removes it."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from gpujobs.harness.databases import (
    create_postgres_database,
    drop_postgres_database,
    postgres_unavailable_reason,
    sqlite_url,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    url = create_postgres_database()
    try:
        yield url
    finally:
        from db.session import dispose_engines

        dispose_engines()
        drop_postgres_database(url)


def _engine(url: str):
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def test_upgrade_head_gives_exactly_the_models_and_downgrade_base_removes_them(empty_database):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import migrations
    from db.models import Base

    engine = _engine(empty_database)
    try:
        assert inspect(engine).get_table_names() == []
        migrations.upgrade(empty_database)

        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            diff = compare_metadata(context, Base.metadata)
            tables = set(inspect(connection).get_table_names())
            version = context.get_current_revision()
        assert diff == [], f"the migrated schema differs from db/models.py: {diff}"
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        assert version is not None

        # Upgrading again is a no-op.
        migrations.upgrade(empty_database)

        migrations.downgrade(empty_database)
        with engine.connect() as connection:
            left = set(inspect(connection).get_table_names()) - {"alembic_version"}
            assert MigrationContext.configure(connection).get_current_revision() is None
        assert left == set()

        # And back up again from base, as a fresh deployment would.
        migrations.upgrade(empty_database)
        with engine.connect() as connection:
            assert (
                compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
                == []
            )
    finally:
        engine.dispose()
