"""webhook endpoints: fair turns, concurrency and a circuit breaker per (tenant, origin)

Revision ID: 0008_webhook_endpoints
Revises: 0007_scale_indexes
Create Date: 2026-12-02 03:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.models

revision = "0008_webhook_endpoints"
down_revision = "0007_scale_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("origin", sa.String(length=300), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("trips", sa.Integer(), nullable=False),
        sa.Column("open_until", db.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_turn_at", db.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("changed_at", db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_at", db.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_webhook_endpoints_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
        sa.UniqueConstraint("tenant_id", "origin", name=op.f("uq_webhook_endpoints_tenant_id_origin")),
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("endpoint_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", db.models.UTCDateTime(timezone=True), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_webhook_deliveries_endpoint_id_webhook_endpoints"),
            "webhook_endpoints",
            ["endpoint_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch_op.create_index(
            batch_op.f("ix_webhook_deliveries_endpoint_status_next_attempt"),
            ["endpoint_id", "status", "next_attempt_at"],
            unique=False,
        )
    _backfill()


def _backfill() -> None:
    """Give every delivery still pending its endpoint, so the fair sender finds it."""
    from db.endpoints import endpoint_id, origin

    connection = op.get_bind()
    rows = connection.execute(
        sa.text(
            "SELECT d.id, j.tenant_id, j.webhook FROM webhook_deliveries d JOIN jobs j ON j.id = d.job_id "
            "WHERE d.status = 'pending' AND j.webhook IS NOT NULL"
        )
    ).all()
    now = db.models.utcnow()
    endpoints = sa.table(
        "webhook_endpoints",
        *(sa.column(name) for name in ("id", "tenant_id", "origin", "state", "consecutive_failures", "trips")),
        sa.column("changed_at", db.models.UTCDateTime(timezone=True)),
        sa.column("created_at", db.models.UTCDateTime(timezone=True)),
    )
    made: set[str] = set()
    for delivery_id, tenant_id, url in rows:
        key = endpoint_id(tenant_id, url)
        if key not in made:
            made.add(key)
            connection.execute(
                endpoints.insert().values(
                    id=key,
                    tenant_id=tenant_id,
                    origin=origin(url),
                    state="closed",
                    consecutive_failures=0,
                    trips=0,
                    changed_at=now,
                    created_at=now,
                )
            )
        connection.execute(
            sa.text("UPDATE webhook_deliveries SET endpoint_id = :key WHERE id = :id"), {"key": key, "id": delivery_id}
        )


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_endpoint_status_next_attempt"))
        batch_op.drop_constraint(batch_op.f("fk_webhook_deliveries_endpoint_id_webhook_endpoints"), type_="foreignkey")
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("endpoint_id")
    op.drop_table("webhook_endpoints")
