"""scale: indexes for the time windows and newest-first lists, and job counts kept by a trigger

Revision ID: 0007_scale_indexes
Revises: 0006_retention
Create Date: 2026-12-02 03:30:00.000000

Indexes, so that reads cost what they return, not the size of the history:

- ``jobs (created_at, id)``: the newest-first list of every tenant's jobs (admin, keyset pages) and the
  tenants page's window of submissions;
- ``jobs (status, created_at, id)``: one status's jobs in creation order (the reconciler's oldest queued
  jobs, the lists filtered by status);
- ``jobs (started_at)``: the queue-wait windows of the dashboard and ``/metrics`` (histograms,
  percentiles); the run-time windows, GPU-seconds per tenant and recent failures use retention's partial
  ``ix_jobs_finished_at`` (``0006_retention``);
- ``webhook_attempts (at)``: the window of webhook outcomes in ``/metrics``.

On PostgreSQL they are built ``CONCURRENTLY`` (outside the migration's transaction), so upgrading a
loaded database does not block submissions and transitions while a million rows are indexed.

``job_counts`` and ``job_count_deltas`` (``db.counts``): on PostgreSQL a trigger on ``jobs`` appends +1/-1
per insert, delete and change of type or status, so ``/metrics`` reads a few dozen rows instead of counting
the whole table. The trigger and the first counts are made in one transaction (writes to ``jobs`` wait
for it: a count of the table). SQLite keeps counting the table (single-machine, small).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_scale_indexes"
down_revision = "0006_retention"
branch_labels = None
depends_on = None

INDEXES = (
    ("ix_jobs_created_at_id", "jobs", ["created_at", "id"]),
    ("ix_jobs_status_created", "jobs", ["status", "created_at", "id"]),
    ("ix_jobs_started_at", "jobs", ["started_at"]),
    ("ix_webhook_attempts_at", "webhook_attempts", ["at"]),
)

TRIGGER = """
CREATE FUNCTION gpujobs_count_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO job_count_deltas (type, status, delta) VALUES (NEW.type, NEW.status, 1);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO job_count_deltas (type, status, delta) VALUES (OLD.type, OLD.status, -1);
    ELSE
        INSERT INTO job_count_deltas (type, status, delta) VALUES (OLD.type, OLD.status, -1), (NEW.type, NEW.status, 1);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_count_rows AFTER INSERT OR DELETE ON jobs FOR EACH ROW EXECUTE FUNCTION gpujobs_count_jobs();
CREATE TRIGGER jobs_count_changes AFTER UPDATE OF status, type ON jobs FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.type IS DISTINCT FROM NEW.type)
    EXECUTE FUNCTION gpujobs_count_jobs();
INSERT INTO job_counts (type, status, count) SELECT type, status, count(*) FROM jobs GROUP BY type, status;
"""


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("type", "status", name=op.f("pk_job_counts")),
    )
    op.create_table(
        "job_count_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("delta", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_count_deltas")),
    )
    if op.get_bind().dialect.name != "postgresql":
        for name, table, columns in INDEXES:
            op.create_index(name, table, columns)
        return
    op.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")  # no write between the first counts and the trigger
    op.execute(TRIGGER)
    with op.get_context().autocommit_block():  # commits the above first
        for name, table, columns in INDEXES:
            op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER jobs_count_changes ON jobs")
        op.execute("DROP TRIGGER jobs_count_rows ON jobs")
        op.execute("DROP FUNCTION gpujobs_count_jobs()")
    op.drop_table("job_count_deltas")
    op.drop_table("job_counts")
