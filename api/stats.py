"""Aggregates of the job system for the admin dashboard and ``/metrics/cluster``, computed in SQL.

Every figure is one grouped query, so a page view or a scrape costs a few index or table
scans whatever the number of API processes, and agrees with what the database says.
Durations are worked out by the database itself (PostgreSQL ``extract(epoch …)``, SQLite
``julianday``). Percentiles are ``percentile_cont`` on PostgreSQL; SQLite (single-machine
``gpujobs up``) has no such aggregate, so there the window's durations are read and
interpolated the same way in Python.

Definitions (the dashboard's; the workers' histograms in ``worker.metrics`` measure the same durations):
- queue wait = ``started_at - created_at`` (the latest claim; a requeued job's wait includes its
  earlier run), over jobs that started within the window;
- run time = ``finished_at - started_at``, over jobs that finished within the window;
- GPU-seconds = the run time of jobs on the ``gpu`` and ``train`` queues.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Float, Integer, case, cast, extract, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from db import clock, counts
from db.clock import db_now
from db.models import (
    ApiKey,
    DeliveryStatus,
    Job,
    JobStatus,
    Tenant,
    WebhookDelivery,
    WorkerProcess,
    utcnow,
)
from worker.jobs.spec import Queue

Duration = Literal["queue_wait", "run"]

GPU_QUEUES = tuple(queue.value for queue in Queue if queue.runs_models)
PERCENTILES = (0.5, 0.9, 0.99)


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def epoch(session: Session, column: Any) -> ColumnElement[float]:
    """Seconds since 1970 of a timestamp column, computed by the database."""
    if _dialect(session) == "sqlite":
        return (func.julianday(column) - 2440587.5) * 86400.0
    return cast(extract("epoch", column), Float)


def seconds_between(session: Session, start: Any, end: Any) -> ColumnElement[float]:
    if _dialect(session) == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return cast(extract("epoch", end - start), Float)


def _duration(session: Session, kind: Duration, since: datetime) -> tuple[ColumnElement[float], Any]:
    """The duration expression and the condition selecting the window's jobs."""
    if kind == "queue_wait":
        return seconds_between(session, Job.created_at, Job.started_at), Job.started_at >= since
    return (
        seconds_between(session, Job.started_at, Job.finished_at),
        (Job.finished_at >= since) & Job.started_at.is_not(None),
    )


def broker_queue_depths() -> tuple[dict[str, int], str | None]:
    """Messages waiting per queue in the broker, or why the broker could not say."""
    from worker.celery_app import queue_depths

    try:
        return queue_depths(), None
    except Exception as exc:  # the dashboard still shows what the database knows; /metrics says broker_up 0
        return {}, f"{type(exc).__name__}: {str(exc)[:200]}"


# --- jobs ---------------------------------------------------------------------------------------


def jobs_by_type_and_status(session: Session) -> dict[tuple[str, str], int]:
    """Every job by type and status, from the counts a trigger keeps (``db.counts``), not a count of the table."""
    return counts.counts(session)


def in_flight(session: Session) -> dict[tuple[str, str], int]:
    """Queued and running jobs by type and status (the status index keeps this cheap)."""
    rows = session.execute(
        select(Job.type, Job.status, func.count())
        .where(Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
        .group_by(Job.type, Job.status)
    )
    return {(job_type, status): count for job_type, status, count in rows}


def queued_by_queue(session: Session) -> dict[str, int]:
    """Queued jobs per queue, as the database counts them (the broker may hold fewer or duplicates)."""
    rows = session.execute(
        select(Job.queue, func.count()).where(Job.status == JobStatus.QUEUED.value).group_by(Job.queue)
    )
    return {queue: count for queue, count in rows}


def oldest_queued_age(session: Session) -> dict[str, float]:
    """Seconds the oldest queued job of each job queue has waited (0 for an empty one), on the database's clock."""
    now = db_now(session)
    rows = session.execute(
        select(Job.queue, func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED.value).group_by(Job.queue)
    )
    ages = {queue.value: 0.0 for queue in (Queue.GPU, Queue.TRAIN)}
    for queue, oldest in rows:
        ages[queue] = max(0.0, (now - oldest).total_seconds())
    return ages


def finished_since(session: Session, since: datetime) -> dict[tuple[str, str], int]:
    """Jobs that finished within the window, by type and final status."""
    rows = session.execute(
        select(Job.type, Job.status, func.count())
        .where(Job.finished_at >= since, Job.status.in_([s.value for s in JobStatus if s.finished]))
        .group_by(Job.type, Job.status)
    )
    return {(job_type, status): count for job_type, status, count in rows}


def percentiles(
    session: Session, kind: Duration, since: datetime, fractions: Sequence[float] = PERCENTILES
) -> dict[str, dict[float, float]]:
    """Per job type, continuous percentiles (linear interpolation, as ``percentile_cont``) of the window."""
    duration, window = _duration(session, kind, since)
    if _dialect(session) == "postgresql":
        columns = [func.percentile_cont(q).within_group(duration) for q in fractions]
        rows = session.execute(select(Job.type, *columns).where(window).group_by(Job.type))
        return {job_type: dict(zip(fractions, values, strict=True)) for job_type, *values in rows}
    values: dict[str, list[float]] = defaultdict(list)
    for job_type, seconds in session.execute(select(Job.type, duration).where(window)):
        values[job_type].append(float(seconds))
    return {job_type: {q: percentile_cont(sorted(v), q) for q in fractions} for job_type, v in values.items()}


def percentile_cont(ordered: Sequence[float], fraction: float) -> float:
    """PostgreSQL's ``percentile_cont`` over already sorted values."""
    position = fraction * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class ThroughputBucket:
    start: datetime
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def throughput(session: Session, since: datetime, until: datetime, bucket_seconds: int) -> list[ThroughputBucket]:
    """Jobs finished per time bucket and final status, from ``since`` to ``until`` (empty buckets included)."""
    first = math.floor(since.timestamp() / bucket_seconds)
    last = math.floor(until.timestamp() / bucket_seconds)
    index = _floor_div(session, epoch(session, Job.finished_at), bucket_seconds)
    rows = session.execute(
        select(index, Job.status, func.count())
        .where(Job.finished_at >= datetime.fromtimestamp(first * bucket_seconds, UTC))
        .group_by(index, Job.status)
    )
    buckets = {n: ThroughputBucket(datetime.fromtimestamp(n * bucket_seconds, UTC)) for n in range(first, last + 1)}
    for n, status, count in rows:
        bucket = buckets.get(int(n))
        if bucket is not None:
            bucket.counts[status] = count
    return list(buckets.values())


def _floor_div(session: Session, seconds: ColumnElement[float], divisor: int) -> ColumnElement[int]:
    if _dialect(session) == "sqlite":  # CAST truncates, which is the floor for times after 1970
        return cast(seconds / divisor, Integer)
    return func.floor(seconds / divisor)  # PostgreSQL's CAST would round


def failure_rate(finished: dict[tuple[str, str], int]) -> float | None:
    """Failed / (succeeded + failed) among ``finished_since`` counts; cancels are the client's choice, not failures."""
    failed = sum(n for (_, status), n in finished.items() if status == JobStatus.FAILED.value)
    succeeded = sum(n for (_, status), n in finished.items() if status == JobStatus.SUCCEEDED.value)
    return failed / (failed + succeeded) if failed + succeeded else None


# --- workers --------------------------------------------------------------------------------------


@dataclass
class WorkerView:
    row: WorkerProcess
    state: Literal["alive", "lost", "stopped"]
    silent_seconds: float

    @property
    def device(self) -> dict[str, Any]:
        return self.row.device or {}

    @property
    def warm_models(self) -> list[str]:
        return sorted(name for name, stats in (self.row.models or {}).items() if stats.get("loaded"))


STATE_ORDER = {"alive": 0, "lost": 1, "stopped": 2}


def worker_state(row: WorkerProcess, now: datetime, lost_after: float) -> Literal["alive", "lost", "stopped"]:
    if row.stopped_at is not None:
        return "stopped"
    return "lost" if (now - row.last_seen_at).total_seconds() > lost_after else "alive"


def workers(session: Session, lost_after: float, seen_since: datetime, limit: int = 500) -> list[WorkerView]:
    """Workers heard from since ``seen_since``: alive first, then lost (silent > ``lost_after`` s), then stopped.
    Silence is measured on the database's clock, the one the heartbeats are written with."""
    now = db_now(session)
    rows = session.scalars(
        select(WorkerProcess)
        .where(WorkerProcess.last_seen_at >= seen_since)
        .order_by(WorkerProcess.last_seen_at.desc())
        .limit(limit)
    ).all()
    found = [
        WorkerView(row, worker_state(row, now, lost_after), max(0.0, (now - row.last_seen_at).total_seconds()))
        for row in rows
    ]
    return sorted(found, key=lambda w: (STATE_ORDER[w.state], w.row.hostname, w.row.id))


# --- queues: work and consumers ------------------------------------------------------------------


@dataclass(frozen=True)
class QueueHealth:
    """One queue: the work waiting for it, the alive workers that serve it, and whether it is stalled."""

    work: int
    consumers: int

    @property
    def stalled(self) -> bool:
        """Work and nobody to do it: nothing will ever pick it up until a worker serving the queue starts."""
        return self.work > 0 and self.consumers == 0


def queue_consumers(session: Session, lost_after: float, limit: int = 10_000) -> dict[str, int]:
    """Per known queue, the alive workers (heard from within ``lost_after`` s, not stopped) that serve it.

    A worker stopped gracefully (or draining) has ``stopped_at`` set and drops out at once; a SIGKILLed one
    once it has been silent for ``lost_after`` (``worker_lost_seconds``) on the database's clock."""
    rows = session.execute(
        select(WorkerProcess.queues)
        .where(WorkerProcess.stopped_at.is_(None), WorkerProcess.last_seen_at >= clock.now(session, -lost_after))
        .limit(limit)
    )
    counts = {queue.value: 0 for queue in Queue}
    for (queues,) in rows:
        for queue in set(queues or []):
            if queue in counts:
                counts[queue] += 1
    return counts


def queue_work(session: Session) -> dict[str, int]:
    """Per known queue, the work that needs a worker serving it:

    - ``gpu``, ``train``: queued jobs;
    - ``webhooks``: deliveries that are due (pending, their next attempt's time has come);
    - ``maintenance``: queued and running jobs, the ones the reconciler guards (without it, a job whose
      worker died is never requeued and a job whose message was lost is never sent again)."""
    work = {queue.value: 0 for queue in Queue}
    for queue, count in queued_by_queue(session).items():
        if queue in work and queue != Queue.MAINTENANCE.value:
            work[queue] = count
    work[Queue.WEBHOOKS.value] = session.execute(
        select(func.count()).where(
            WebhookDelivery.status == DeliveryStatus.PENDING.value,
            WebhookDelivery.next_attempt_at <= clock.now(session),
        )
    ).scalar_one()
    work[Queue.MAINTENANCE.value] = session.execute(
        select(func.count()).where(Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
    ).scalar_one()
    return work


def queue_health(session: Session, lost_after: float) -> dict[str, QueueHealth]:
    """Every known queue's work, consumers and stall (a few grouped queries)."""
    work, consumers = queue_work(session), queue_consumers(session, lost_after)
    return {queue.value: QueueHealth(work[queue.value], consumers[queue.value]) for queue in Queue}


# --- tenants --------------------------------------------------------------------------------------


@dataclass
class TenantUsage:
    id: str
    name: str
    created_at: datetime
    active_keys: int = 0
    jobs: dict[str, int] = field(default_factory=dict)  # submitted in the period, by current status
    gpu_seconds: float = 0.0  # run time of gpu/train jobs that finished in the period

    @property
    def total_jobs(self) -> int:
        return sum(self.jobs.values())


def tenant_usage(session: Session, since: datetime, limit: int = 500) -> list[TenantUsage]:
    """Per tenant: jobs submitted and GPU-seconds used since ``since``, busiest first."""
    tenants = {
        tenant_id: TenantUsage(tenant_id, name, created_at, int(active or 0))
        for tenant_id, name, created_at, active in session.execute(
            select(
                Tenant.id,
                Tenant.name,
                Tenant.created_at,
                func.sum(case((ApiKey.id.is_not(None) & ApiKey.revoked_at.is_(None), 1), else_=0)),
            )
            .outerjoin(ApiKey, ApiKey.tenant_id == Tenant.id)
            .group_by(Tenant.id, Tenant.name, Tenant.created_at)
        )
    }
    submitted = session.execute(
        select(Job.tenant_id, Job.status, func.count())
        .where(Job.created_at >= since)
        .group_by(Job.tenant_id, Job.status)
    )
    for tenant_id, status, count in submitted:
        if tenant_id in tenants:
            tenants[tenant_id].jobs[status] = count
    run = seconds_between(session, Job.started_at, Job.finished_at)
    used = session.execute(
        select(Job.tenant_id, func.sum(run))
        .where(Job.finished_at >= since, Job.started_at.is_not(None), Job.queue.in_(GPU_QUEUES))
        .group_by(Job.tenant_id)
    )
    for tenant_id, seconds in used:
        if tenant_id in tenants:
            tenants[tenant_id].gpu_seconds = float(seconds or 0.0)
    ranked = sorted(tenants.values(), key=lambda t: (-t.gpu_seconds, -t.total_jobs, t.name, t.id))
    return ranked[:limit]


# --- webhooks -------------------------------------------------------------------------------------


def webhook_deliveries_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status))
    found = {status.value: 0 for status in DeliveryStatus}
    found.update({status: count for status, count in rows})
    return found


def window_start(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)
