"""retention: indexes for expiring artifacts and purging old jobs

Revision ID: 0006_retention
Revises: 0005
Create Date: 2026-12-02 03:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_retention"
down_revision = "0006_quotas"
branch_labels = None
depends_on = None

UNEXPIRED = sa.text("expired_at IS NULL")
FINISHED = sa.text("finished_at IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"], postgresql_where=FINISHED, sqlite_where=FINISHED)
    op.create_index(
        "ix_artifacts_unexpired", "artifacts", ["created_at"], postgresql_where=UNEXPIRED, sqlite_where=UNEXPIRED
    )
    op.create_index("ix_models_job_id", "models", ["job_id"])
    op.create_index("ix_models_storage_key", "models", ["storage_key"])


def downgrade() -> None:
    op.drop_index("ix_models_storage_key", table_name="models")
    op.drop_index("ix_models_job_id", table_name="models")
    op.drop_index("ix_artifacts_unexpired", table_name="artifacts")
    op.drop_index("ix_jobs_finished_at", table_name="jobs")
