"""Jobs by type and status without counting the ``jobs`` table: a rollup plus the changes since.

On PostgreSQL a trigger on ``jobs`` (migration ``0007_scale_indexes``) appends a row to ``job_count_deltas`` for every
insert (+1), delete (-1) and change of status or type (-1 for the old pair, +1 for the new one). Appending
takes no lock that another transition waits for, unlike incrementing one counter row per pair, which would
make every concurrent transition of that type queue behind the last until it commits.

``counts`` reads ``job_counts`` plus the deltas in one statement (one snapshot, so it agrees with the
table at that instant); ``compact`` folds the deltas into ``job_counts``. The reconciler compacts on every
pass, so the deltas stay a few seconds of transitions; a compaction is one transaction (the rollup and the
deleted deltas change together) and only one runs at a time (an advisory lock; the others skip).

SQLite (single-machine ``gpujobs up``) has no trigger: there ``counts`` counts the table.
"""

from __future__ import annotations

from sqlalchemy import TextClause, func, select, text, union_all
from sqlalchemy.orm import Session

from db.models import Job, JobCount, JobCountDelta

COMPACT_LOCK = 0x6770_6A63  # pg advisory lock key ("gpjc"): one compaction at a time

COMPACT = text(
    """
    WITH moved AS (DELETE FROM job_count_deltas RETURNING type, status, delta),
         summed AS (SELECT type, status, sum(delta) AS n FROM moved GROUP BY type, status)
    INSERT INTO job_counts (type, status, count)
    SELECT type, status, n FROM summed
    ON CONFLICT (type, status) DO UPDATE SET count = job_counts.count + EXCLUDED.count
    """
)


def postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def counts(session: Session) -> dict[tuple[str, str], int]:
    """Jobs by (type, status); pairs with no job are left out."""
    if not postgres(session):
        rows = session.execute(select(Job.type, Job.status, func.count()).group_by(Job.type, Job.status))
        return {(job_type, status): count for job_type, status, count in rows}
    parts = union_all(
        select(JobCount.type, JobCount.status, JobCount.count.label("n")),
        select(JobCountDelta.type, JobCountDelta.status, JobCountDelta.delta.label("n")),
    ).subquery()
    total = func.sum(parts.c.n)
    rows = session.execute(
        select(parts.c.type, parts.c.status, total).group_by(parts.c.type, parts.c.status).having(total != 0)
    )
    return {(job_type, status): int(count) for job_type, status, count in rows}


def compact(session: Session) -> bool:
    """Fold the deltas into ``job_counts`` (PostgreSQL); False when another process is at it (or SQLite).
    The caller commits."""
    return compact_once(session, COMPACT_LOCK, COMPACT)


def compact_once(session: Session, lock: int, statement: TextClause) -> bool:
    """Run a rollup's ``statement`` under the transaction-scoped advisory ``lock`` (PostgreSQL): False when
    another process holds it, or on SQLite (no deltas there). Shared by the job counts and retained bytes."""
    if not postgres(session):
        return False
    if not session.execute(select(func.pg_try_advisory_xact_lock(lock))).scalar_one():
        return False
    session.execute(statement)
    return True
