"""scheduling: job priority, per-tenant quotas, artifact expiry

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 03:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Integer(), server_default="5", nullable=False))
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expired_at", db.models.UTCDateTime(timezone=True), nullable=True))
    op.create_table(
        "tenant_quotas",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("weight", sa.Double(), nullable=True),
        sa.Column("max_queued_jobs", sa.Integer(), nullable=True),
        sa.Column("max_running_jobs", sa.Integer(), nullable=True),
        sa.Column("submits_per_minute", sa.Integer(), nullable=True),
        sa.Column("max_retained_bytes", sa.BigInteger(), nullable=True),
        sa.Column("artifact_ttl_seconds", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", db.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_tenant_quotas_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tenant_quotas")),
    )


def downgrade() -> None:
    op.drop_table("tenant_quotas")
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_column("expired_at")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("priority")
