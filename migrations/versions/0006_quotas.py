"""quotas: an index to count a tenant's queued and running jobs at every submit

Revision ID: 0006_quotas
Revises: 0005
Create Date: 2026-12-02 03:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0006_quotas"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_tenant_status_queue", ["tenant_id", "status", "queue"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_tenant_status_queue")
