"""gpu seconds: each tenant's recent run time per queue kept by a trigger, for the scheduler's fair share

Revision ID: 0013_gpu_seconds
Revises: 0012_tenant_type_index
Create Date: 2026-12-02 07:20:00.000000

The scheduler summed the run time of every job finished in its window at every dispatch pass (after every
job's end): with a busy queue, thousands of rows a pass. ``gpu_seconds`` (queue, tenant, 10-second bucket)
plus ``gpu_seconds_deltas`` (appended by a trigger on ``jobs`` when a started job gets its ``finished_at``)
make it a few rows per tenant; the reconciler folds the deltas and drops the old buckets (``db.gpu_seconds``).

On PostgreSQL the trigger and the first buckets (every job finished in the last 7 days, the longest
window the setting allows) are made in one transaction that writes to ``jobs`` wait for. SQLite keeps
summing the jobs (single-machine, small).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import db.models

revision = "0013_gpu_seconds"
down_revision = "0012_tenant_type_index"
branch_labels = None
depends_on = None

BUCKET = "date_bin('10 seconds', {row}.finished_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
RUN_SECONDS = "greatest(extract(epoch FROM {row}.finished_at - {row}.started_at), 0)"

TRIGGER = f"""
CREATE FUNCTION gpujobs_gpu_seconds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO gpu_seconds_deltas (queue, tenant_id, bucket, seconds)
    VALUES (NEW.queue, NEW.tenant_id, {BUCKET.format(row="NEW")}, {RUN_SECONDS.format(row="NEW")});
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_gpu_seconds_finished AFTER UPDATE OF finished_at ON jobs FOR EACH ROW
    WHEN (OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL AND NEW.started_at IS NOT NULL)
    EXECUTE FUNCTION gpujobs_gpu_seconds();
CREATE TRIGGER jobs_gpu_seconds_inserted AFTER INSERT ON jobs FOR EACH ROW
    WHEN (NEW.finished_at IS NOT NULL AND NEW.started_at IS NOT NULL)
    EXECUTE FUNCTION gpujobs_gpu_seconds();
INSERT INTO gpu_seconds (queue, tenant_id, bucket, seconds, jobs)
SELECT queue, tenant_id, {BUCKET.format(row="jobs")}, sum({RUN_SECONDS.format(row="jobs")}), count(*)
FROM jobs
WHERE finished_at > now() - interval '7 days' AND started_at IS NOT NULL
GROUP BY 1, 2, 3;
"""


def upgrade() -> None:
    op.create_table(
        "gpu_seconds",
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("bucket", db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("queue", "tenant_id", "bucket", name=op.f("pk_gpu_seconds")),
    )
    op.create_table(
        "gpu_seconds_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("queue", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("bucket", db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gpu_seconds_deltas")),
    )
    op.create_index("ix_gpu_seconds_deltas_queue_tenant", "gpu_seconds_deltas", ["queue", "tenant_id", "bucket"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")  # no finish between the first buckets and the trigger
        op.execute(TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER jobs_gpu_seconds_inserted ON jobs")
        op.execute("DROP TRIGGER jobs_gpu_seconds_finished ON jobs")
        op.execute("DROP FUNCTION gpujobs_gpu_seconds()")
    op.drop_index("ix_gpu_seconds_deltas_queue_tenant", table_name="gpu_seconds_deltas")
    op.drop_table("gpu_seconds_deltas")
    op.drop_table("gpu_seconds")
