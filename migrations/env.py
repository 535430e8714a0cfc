from __future__ import annotations

import logging

from alembic import context

from db.models import Base
from db.session import migration_engine

config = context.config
if config.config_file_name and not logging.getLogger().handlers:
    from logging.config import fileConfig

    fileConfig(config.config_file_name, disable_existing_loggers=False)

url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")


def run_migrations_online() -> None:
    engine = migration_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations_online()
