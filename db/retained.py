"""Each tenant's bytes of unexpired artifacts without summing them: a rollup plus the changes since.

On PostgreSQL triggers (migration ``0010_retained_bytes``) append a row to ``retained_bytes_deltas`` for every statement
that changes a tenant's unexpired artifacts: + the size of rows inserted, - the size of rows expired or
deleted (retention, a job's purge, a second attempt replacing its outputs). As for the job counts
(``db.counts``), appending takes no lock that another job's success waits for.

``retained`` reads ``retained_bytes`` plus the deltas in one statement (one snapshot); ``compact`` folds the
deltas into ``retained_bytes``, on every reconcile pass, one process at a time (an advisory lock).

SQLite (single-machine ``gpujobs up``) has no trigger: there ``retained`` sums the artifacts.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import func, select, text, union_all
from sqlalchemy.orm import Session

from db.counts import compact_once, postgres
from db.models import Artifact, Job, RetainedBytes, RetainedBytesDelta

COMPACT_LOCK = 0x6770_6A62  # pg advisory lock key ("gpjb"): one compaction at a time

COMPACT = text(
    """
    WITH moved AS (DELETE FROM retained_bytes_deltas RETURNING tenant_id, delta),
         summed AS (SELECT tenant_id, sum(delta) AS n FROM moved GROUP BY tenant_id)
    INSERT INTO retained_bytes (tenant_id, bytes)
    SELECT tenant_id, n FROM summed
    ON CONFLICT (tenant_id) DO UPDATE SET bytes = retained_bytes.bytes + EXCLUDED.bytes
    """
)


def retained(session: Session, tenant_ids: Collection[str]) -> dict[str, int]:
    """Bytes of each tenant's artifacts that retention has not expired; tenants with none are left out."""
    ids = list(dict.fromkeys(tenant_ids))
    if not ids:
        return {}
    if not postgres(session):
        rows = session.execute(
            select(Job.tenant_id, func.sum(Artifact.size))
            .join(Job, Job.id == Artifact.job_id)
            .where(Job.tenant_id.in_(ids), Artifact.expired_at.is_(None))
            .group_by(Job.tenant_id)
        )
    else:
        parts = union_all(
            select(RetainedBytes.tenant_id, RetainedBytes.bytes.label("n")).where(RetainedBytes.tenant_id.in_(ids)),
            select(RetainedBytesDelta.tenant_id, RetainedBytesDelta.delta.label("n")).where(
                RetainedBytesDelta.tenant_id.in_(ids)
            ),
        ).subquery()
        rows = session.execute(select(parts.c.tenant_id, func.sum(parts.c.n)).group_by(parts.c.tenant_id))
    return {tenant_id: int(total) for tenant_id, total in rows if total}


def compact(session: Session) -> bool:
    """Fold the deltas into ``retained_bytes`` (PostgreSQL); False when another process is at it (or SQLite).
    The caller commits."""
    return compact_once(session, COMPACT_LOCK, COMPACT)
