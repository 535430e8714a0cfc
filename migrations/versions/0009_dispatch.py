"""dispatch: workers' slots (the scheduler's capacity) and the index of waiting jobs

Revision ID: 0009_dispatch
Revises: 0008_webhook_endpoints
Create Date: 2026-12-02 03:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_dispatch"
down_revision = "0008_webhook_endpoints"
branch_labels = None
depends_on = None

WAITING = "status = 'queued' AND dispatched_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("slots", sa.Integer(), server_default="1", nullable=False))
    op.create_index(
        "ix_jobs_waiting",
        "jobs",
        ["queue", "tenant_id", "priority", "created_at"],
        unique=False,
        postgresql_where=sa.text(WAITING),
        sqlite_where=sa.text(WAITING),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_waiting", table_name="jobs")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("slots")
