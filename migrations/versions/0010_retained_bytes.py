"""retained bytes: each tenant's bytes of unexpired artifacts kept by triggers

Revision ID: 0010_retained_bytes
Revises: 0009_dispatch
Create Date: 2026-12-02 04:20:00.000000

``retained_bytes`` and ``retained_bytes_deltas`` (``db.retained``): on PostgreSQL triggers append each
change of a tenant's bytes of unexpired artifacts, so a quota check or the tenants page reads a few rows
instead of summing every artifact through its job:

- on ``artifacts``, one trigger per statement (transition tables): + the size of rows inserted unexpired,
  - the size of rows deleted unexpired, and for an update - the old row + the new one (so expiring an
  artifact is - its size). The tenant is the artifact's job's (a primary-key lookup);
- on ``jobs``, before a row is deleted: - its unexpired artifacts (locked, so an expiry at the same time
  does not subtract them twice). The artifacts' own trigger then finds no job for the rows the delete
  cascades to, and adds nothing.

The triggers and the first totals are made in one transaction; writes to ``artifacts`` wait for it (one sum
over the unexpired artifacts). SQLite keeps summing the table (single-machine, small).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_retained_bytes"
down_revision = "0009_dispatch"
branch_labels = None
depends_on = None


def _changed(rows: str, sign: str) -> str:
    """Each tenant's change from the rows of a transition table, unexpired rows only."""
    return f"""
        SELECT (SELECT j.tenant_id FROM jobs j WHERE j.id = a.job_id) AS tenant_id, {sign}a.size AS delta
        FROM {rows} a WHERE a.expired_at IS NULL"""


def _append(changes: str) -> str:
    return f"""
        INSERT INTO retained_bytes_deltas (tenant_id, delta)
        SELECT tenant_id, sum(delta) FROM ({changes}) c
        WHERE tenant_id IS NOT NULL GROUP BY tenant_id HAVING sum(delta) <> 0;"""


TRIGGERS = f"""
CREATE FUNCTION gpujobs_retained_bytes_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN {_append(_changed("new_artifacts", ""))}
    RETURN NULL;
END
$$;
CREATE FUNCTION gpujobs_retained_bytes_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN {_append(_changed("old_artifacts", "-"))}
    RETURN NULL;
END
$$;
CREATE FUNCTION gpujobs_retained_bytes_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN {_append(_changed("old_artifacts", "-") + " UNION ALL " + _changed("new_artifacts", ""))}
    RETURN NULL;
END
$$;
CREATE FUNCTION gpujobs_retained_bytes_job_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    gone bigint;
BEGIN
    SELECT sum(size) INTO gone
    FROM (SELECT size FROM artifacts WHERE job_id = OLD.id AND expired_at IS NULL FOR UPDATE) a;
    IF gone <> 0 THEN
        INSERT INTO retained_bytes_deltas (tenant_id, delta) VALUES (OLD.tenant_id, -gone);
    END IF;
    RETURN OLD;
END
$$;
CREATE TRIGGER artifacts_retained_inserted AFTER INSERT ON artifacts REFERENCING NEW TABLE AS new_artifacts
    FOR EACH STATEMENT EXECUTE FUNCTION gpujobs_retained_bytes_inserted();
CREATE TRIGGER artifacts_retained_deleted AFTER DELETE ON artifacts REFERENCING OLD TABLE AS old_artifacts
    FOR EACH STATEMENT EXECUTE FUNCTION gpujobs_retained_bytes_deleted();
CREATE TRIGGER artifacts_retained_updated AFTER UPDATE ON artifacts
    REFERENCING OLD TABLE AS old_artifacts NEW TABLE AS new_artifacts
    FOR EACH STATEMENT EXECUTE FUNCTION gpujobs_retained_bytes_updated();
CREATE TRIGGER jobs_retained_deleted BEFORE DELETE ON jobs FOR EACH ROW
    EXECUTE FUNCTION gpujobs_retained_bytes_job_deleted();
INSERT INTO retained_bytes (tenant_id, bytes)
SELECT j.tenant_id, sum(a.size) FROM artifacts a JOIN jobs j ON j.id = a.job_id
WHERE a.expired_at IS NULL GROUP BY j.tenant_id;
"""

FUNCTIONS = ("inserted", "deleted", "updated", "job_deleted")


def upgrade() -> None:
    op.create_table(
        "retained_bytes",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_retained_bytes")),
    )
    op.create_table(
        "retained_bytes_deltas",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("delta", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retained_bytes_deltas")),
    )
    op.create_index("ix_retained_bytes_deltas_tenant", "retained_bytes_deltas", ["tenant_id"])
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("LOCK TABLE artifacts IN SHARE ROW EXCLUSIVE MODE")  # no write between the first totals and the triggers
    op.execute(TRIGGERS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER jobs_retained_deleted ON jobs")
        for name in ("inserted", "deleted", "updated"):
            op.execute(f"DROP TRIGGER artifacts_retained_{name} ON artifacts")
        for name in FUNCTIONS:
            op.execute(f"DROP FUNCTION gpujobs_retained_bytes_{name}()")
    op.drop_index("ix_retained_bytes_deltas_tenant", table_name="retained_bytes_deltas")
    op.drop_table("retained_bytes_deltas")
    op.drop_table("retained_bytes")
