"""scale: a tenant's jobs of one type, newest first, from an index of their own

Revision ID: 0012_tenant_type_index
Revises: 0011_retry
Create Date: 2026-12-02 07:00:00.000000

``GET /v1/jobs?type=…`` as a user walked ``jobs (tenant_id, created_at, id)`` newest first and kept the
rows of that type: on a busy tenant with a long history, a page of a rare type read every row of the others
(issue 15 item 6: 2.7x between 1,000 and 1,000,000 jobs). ``jobs (tenant_id, type, created_at, id)`` gives
the page an exact range. On PostgreSQL it is built ``CONCURRENTLY`` (outside the migration's transaction),
so upgrading a loaded database does not block submissions.
"""

from __future__ import annotations

from alembic import op

revision = "0012_tenant_type_index"
down_revision = "0011_retry"
branch_labels = None
depends_on = None

NAME, TABLE, COLUMNS = "ix_jobs_tenant_type_created", "jobs", ["tenant_id", "type", "created_at", "id"]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(NAME, TABLE, COLUMNS)
        return
    with op.get_context().autocommit_block():
        op.create_index(NAME, TABLE, COLUMNS, postgresql_concurrently=True, if_not_exists=True)


def downgrade() -> None:
    op.drop_index(NAME, table_name=TABLE)
