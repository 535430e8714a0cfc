"""Each tenant's recent GPU-seconds per queue, for the scheduler's fair share, without reading its jobs.

The scheduler (``worker.dispatcher``) orders tenants by the run time of their jobs that finished in the
last ``fair_share_window_seconds``. Summed from ``jobs`` that read every job finished in the window at every
pass: at 13 jobs a second and the default 10 minutes, 8,000 rows and about 17 ms a pass, paid after every
job's end, which is what held a backlog's throughput down in the soak (docs/benchmarks.md, "Soak").

On PostgreSQL a trigger on ``jobs`` (migration ``0013_gpu_seconds``) appends one row to
``gpu_seconds_deltas`` when a job that started gets its ``finished_at`` (succeeded, failed, or canceled while
running): its queue, tenant, 10-second bucket of the finish and run time. Appending takes no lock that
another job's end waits for (as ``db.counts``). ``compact`` folds the deltas into ``gpu_seconds`` (one row
per queue, tenant and bucket) and drops buckets older than the window, on every reconcile pass, one process
at a time. ``recent`` reads both for the tenants in question: a few rows per tenant and bucket.

A bucket counts while its end is inside the window, so the window reaches back up to one bucket (10 s)
further than asked. SQLite (single-machine ``gpujobs up``) has no trigger: there ``recent`` sums the jobs.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import and_, func, literal, select, text, union_all
from sqlalchemy.orm import Session

from db import clock
from db.counts import compact_once, postgres
from db.models import GpuSeconds, GpuSecondsDelta, Job

BUCKET_SECONDS = 10
COMPACT_LOCK = 0x6770_6A73  # pg advisory lock key ("gpjs"): one compaction at a time

COMPACT = text(
    """
    WITH moved AS (DELETE FROM gpu_seconds_deltas RETURNING queue, tenant_id, bucket, seconds),
         summed AS (SELECT queue, tenant_id, bucket, sum(seconds) AS s, count(*) AS n
                    FROM moved GROUP BY queue, tenant_id, bucket)
    INSERT INTO gpu_seconds (queue, tenant_id, bucket, seconds, jobs)
    SELECT queue, tenant_id, bucket, s, n FROM summed
    ON CONFLICT (queue, tenant_id, bucket)
    DO UPDATE SET seconds = gpu_seconds.seconds + EXCLUDED.seconds, jobs = gpu_seconds.jobs + EXCLUDED.jobs
    """
)
PRUNE = text("DELETE FROM gpu_seconds WHERE bucket < now() - make_interval(secs => :keep)")


def recent(
    session: Session, queue: str, tenant_ids: Collection[str], window_seconds: float
) -> dict[str, tuple[float, int]]:
    """Each tenant's (GPU-seconds, jobs) of ``queue`` finished in the last ``window_seconds``; absent: none."""
    ids = list(dict.fromkeys(tenant_ids))
    if not ids:
        return {}
    if not postgres(session):
        elapsed = (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
        rows = session.execute(
            select(Job.tenant_id, func.sum(elapsed), func.count())
            .where(
                Job.queue == queue,
                Job.tenant_id.in_(ids),
                Job.started_at.is_not(None),
                and_(Job.finished_at.is_not(None), Job.finished_at >= clock.now(session, -window_seconds)),
            )
            .group_by(Job.tenant_id)
        )
    else:
        since = clock.now(session, -(window_seconds + BUCKET_SECONDS))
        parts = union_all(
            select(GpuSeconds.tenant_id, GpuSeconds.seconds, GpuSeconds.jobs).where(
                GpuSeconds.queue == queue, GpuSeconds.tenant_id.in_(ids), GpuSeconds.bucket > since
            ),
            select(GpuSecondsDelta.tenant_id, GpuSecondsDelta.seconds, literal(1).label("jobs")).where(
                GpuSecondsDelta.queue == queue, GpuSecondsDelta.tenant_id.in_(ids), GpuSecondsDelta.bucket > since
            ),
        ).subquery()
        columns = list(parts.c)
        rows = session.execute(select(columns[0], func.sum(columns[1]), func.sum(columns[2])).group_by(columns[0]))
    return {tenant_id: (float(seconds or 0.0), int(jobs or 0)) for tenant_id, seconds, jobs in rows}


def compact(session: Session, window_seconds: float) -> bool:
    """Fold the deltas into ``gpu_seconds`` and drop the buckets that left the window (PostgreSQL); False
    when another process is at it (or SQLite). The caller commits."""
    if not compact_once(session, COMPACT_LOCK, COMPACT):
        return False
    session.execute(PRUNE, {"keep": window_seconds + 2 * BUCKET_SECONDS})
    return True
