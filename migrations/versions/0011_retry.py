"""retry: a job made by POST /v1/jobs/{id}/retry names the job it retries

Revision ID: 0011_retry
Revises: 0010_retained_bytes
Create Date: 2026-12-02 04:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_retry"
down_revision = "0010_retained_bytes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retry_of", sa.String(length=40), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_jobs_retry_of_jobs"), "jobs", ["retry_of"], ["id"], ondelete="SET NULL"
        )
        batch_op.create_index("ix_jobs_retry_of", ["retry_of"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_retry_of")
        batch_op.drop_constraint(batch_op.f("fk_jobs_retry_of_jobs"), type_="foreignkey")
        batch_op.drop_column("retry_of")
