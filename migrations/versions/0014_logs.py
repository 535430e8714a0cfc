"""logs: the W3C traceparent of the request that submitted a job, so the job's later steps join its trace

Revision ID: 0014_logs
Revises: 0013_gpu_seconds
Create Date: 2026-12-02 06:50:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_logs"
down_revision = "0013_gpu_seconds"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("traceparent", sa.String(length=55), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("traceparent")
