"""The scheduler: admission in the database, dispatch by fair share (see "Scheduling" in docs/architecture.md).

A submitted job is committed ``queued`` with ``dispatched_at`` NULL: it waits in the database. A
``dispatch_pass(queue)`` sends the broker only as many jobs as the queue's consumers can take soon:

    free = live slots (alive, not stopped workers serving the queue × their concurrency)
           + dispatch_buffer − in flight (running, or queued and sent)

and picks them by fair share between tenants (least weighted recent GPU-seconds first, charged one
expected job per pick), each tenant's ``max_running_jobs`` on the queue, then priority, then age.

Passes run after a submit commits (API), after a job ends and when a worker starts (worker), after an
admin retry, and on every reconcile (the safety net). Several may run at once: on PostgreSQL each pass
holds a transaction-scoped advisory lock of its queue while it counts and marks, so two passes never
both fill the same free slots; on SQLite the single writer serializes them. Messages are sent after the
commit (which does not wait for the disk: ``_lock``); a failed send undoes the mark (``undo_dispatch``) and
a later pass sends the job.
"""

from __future__ import annotations

import functools
import heapq
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, or_, select, text
from sqlalchemy.orm import Session

from db import clock, gpu_seconds, quotas, transitions
from db.models import Job, JobStatus, WorkerProcess
from db.session import session_scope
from db.settings import Settings, get_settings
from worker.celery_app import dispatch
from worker.jobs.spec import Queue

log = logging.getLogger(__name__)

LOCK_NAMESPACE = 0x6A6F6273  # "jobs": the first key of the scheduler's advisory locks (the queue's is the second)
DEFAULT_CHARGE = 1.0  # GPU-seconds charged per pick when the queue finished no job in the window

JOB_QUEUES = tuple(queue.value for queue in Queue if queue.runs_models)

_QUEUED = Job.status == JobStatus.QUEUED.value
_RUNNING = Job.status == JobStatus.RUNNING.value
_WAITING = and_(_QUEUED, Job.dispatched_at.is_(None))
_IN_FLIGHT = or_(_RUNNING, and_(_QUEUED, Job.dispatched_at.is_not(None)))


@dataclass(order=True)
class _Turn:
    """One tenant's place in a pass: the tenant with the least weighted usage (then the oldest job) goes next."""

    share: float
    oldest: datetime
    tenant_id: str = field(compare=False)


def dispatch_pass(
    queue: str, settings: Settings | None = None, by: str = "the scheduler", submitted: str | None = None
) -> list[str]:
    """Send the next jobs of ``queue`` that its consumers can take soon; the ids sent (in order).

    Each job sent gets a ``dispatched`` event naming ``by``, except ``submitted``, the job whose submit runs
    this pass (sent at once, the common case: its timeline stays ``queued``, ``claimed``, …).

    What it costs (the submit's and the job end's hot path): one statement when nothing waits or no slot is
    free (the live slots come from a per-process cache, ``_live_slots``); otherwise the lock, one pick that
    also reads the tenants' quotas, and one UPDATE plus one INSERT of the events, in one transaction."""
    settings = settings or get_settings()
    with session_scope() as session:
        # Unlocked first (one or two cheap statements): most passes find nothing waiting or no slot free.
        capacity = _capacity_if_waiting(session, queue, settings)
        if capacity is None:
            return []
        _lock(session, queue)
        picked = _pick(session, queue, settings, capacity)  # in flight counted again, under the lock
        # The jobs' ``dispatched`` events (but the submitted one's) go in with the mark: no third transaction.
        marked = transitions.mark_dispatched(session, picked, by, silent=[submitted] if submitted else [])
    sent: list[str] = []
    for job_id in [job_id for job_id in picked if job_id in marked]:
        try:
            dispatch(job_id, queue, settings)
        except Exception as exc:  # the broker is away: unmark the rest; a later pass (or the reconciler) sends them
            log.warning("could not send %s to %s, it waits in the database: %s", job_id, queue, exc)
            with session_scope() as session:
                transitions.undo_dispatch(session, *[j for j in marked if j not in sent])
            break
        sent.append(job_id)
    return sent


def dispatch_all(
    queues: Iterable[str] = JOB_QUEUES, settings: Settings | None = None, by: str = "the scheduler"
) -> list[str]:
    """A pass on each queue (the reconciler's safety net, a worker's start); never raises, the ids sent."""
    sent: list[str] = []
    for queue in queues:
        sent += dispatch_soon(queue, settings, by)
    return sent


def dispatch_soon(
    queue: str, settings: Settings | None = None, by: str = "the scheduler", submitted: str | None = None
) -> list[str]:
    """``dispatch_pass`` for callers that must not fail (a submit, a job's end): errors are logged, the
    reconciler's pass catches up."""
    try:
        return dispatch_pass(queue, settings, by, submitted)
    except Exception as exc:
        log.warning("dispatch pass on %s failed (the reconciler's pass retries): %s", queue, exc)
        return []


# The lock, and this transaction's commit made asynchronous (in the same round trip): see ``_lock``.
_LOCK = text("SELECT pg_advisory_xact_lock(:namespace, :key), set_config('synchronous_commit', 'off', true)")


def _lock(session: Session, queue: str) -> None:
    """Serialize passes on ``queue`` until this transaction ends (PostgreSQL; SQLite has one writer).

    The pass's commit does not wait for its WAL to reach the disk (``synchronous_commit`` off for this
    transaction only: one flush less on the way from a submit to its job's start). Nothing is lost that
    matters: a server crash may forget the last few marks of a fraction of a second, and a job whose mark
    is forgotten looks waiting again, so a later pass sends it a second message, which its claim (the
    fence: only a ``queued`` job is claimed) drops if the first one ran it."""
    if session.get_bind().dialect.name == "postgresql":
        key = zlib.crc32(queue.encode()) - 2**31  # a stable int4
        session.execute(_LOCK, {"namespace": LOCK_NAMESPACE, "key": key})


def _live_workers(session: Session, settings: Settings) -> Any:
    recent = WorkerProcess.last_seen_at > clock.now(session, -settings.worker_lost_seconds)
    return and_(WorkerProcess.stopped_at.is_(None), recent)


# The live slots of each queue, as this process last read them: (database URL, queue) -> (read at, slots).
_slots: dict[tuple[str, str], tuple[float, int]] = {}
_slots_lock = threading.Lock()
monotonic: Callable[[], float] = time.monotonic  # the cache's clock (a unit test moves it)


def _live_slots(session: Session, queue: str, settings: Settings) -> int:
    """The slots of the live, warm workers serving ``queue`` (each worker's concurrency, at least 1).

    Read at most once every ``dispatch_slots_cache_seconds`` per process and queue: the workers change
    far less often than jobs are submitted, and every submit and job end runs a pass. A stale figure
    errs for that long only: a worker that just started runs a pass of its own (fresh in its process);
    one that just stopped may get a few more jobs sent to its queue, which wait in the broker for the
    next consumer (the reconciler resends any whose message is lost)."""
    ttl = settings.dispatch_slots_cache_seconds
    key = (str(session.get_bind().engine.url), queue)
    now = monotonic()
    if ttl > 0:
        with _slots_lock:
            cached = _slots.get(key)
        if cached is not None and now - cached[0] < ttl:
            return cached[1]
    warm = WorkerProcess.warming.is_(False)  # a worker still warming its models (worker.warm) takes no jobs yet
    workers = session.execute(
        select(WorkerProcess.queues, WorkerProcess.slots).where(_live_workers(session, settings), warm)
    )
    slots: int = sum(max(int(count), 1) for queues, count in workers if queue in (queues or []))
    with _slots_lock:
        _slots[key] = (now, slots)
    return slots


def _in_flight(queue: Any) -> Any:
    return select(func.count()).select_from(Job).where(Job.queue == queue, _IN_FLIGHT).scalar_subquery()


# The statements of every pass are built once, with the queue (and the capacity) as bind parameters:
# building them cost more CPU than running them does on an idle queue.
QUEUE = bindparam("queue", type_=Job.queue.type)


@functools.cache
def _waiting_and_busy() -> Any:
    return select(exists().where(Job.queue == QUEUE, _WAITING), _in_flight(QUEUE))


@functools.cache
def _candidates() -> Any:
    """Each tenant's first ``capacity`` waiting jobs (priority, then age), with the queue's in-flight count
    and the tenant's quota row (NULLs without one: the defaults), in one statement."""
    rank = (
        func.row_number()
        .over(partition_by=Job.tenant_id, order_by=(Job.priority.desc(), Job.created_at, Job.id))
        .label("rank")
    )
    ranked = select(Job.id, Job.tenant_id, Job.created_at, rank).where(Job.queue == QUEUE, _WAITING).subquery()
    overrides = [quotas.QUOTAS.c[name].label(name) for name in quotas.FIELDS]
    return (
        select(ranked.c.id, ranked.c.tenant_id, ranked.c.created_at, _in_flight(QUEUE).label("busy"), *overrides)
        .select_from(ranked.outerjoin(quotas.QUOTAS, quotas.QUOTAS.c.tenant_id == ranked.c.tenant_id))
        .where(ranked.c.rank <= bindparam("capacity"))
        .order_by(ranked.c.tenant_id, ranked.c.rank)
    )


def _capacity_if_waiting(session: Session, queue: str, settings: Settings) -> int | None:
    """The queue's live slots plus the buffer, if a job waits and a slot looks free (else None).

    One statement (an ``EXISTS`` on the partial index ``ix_jobs_waiting`` and the in-flight count), and a
    second (the live workers, a handful of rows) when jobs wait and ``_live_slots`` has no recent figure."""
    any_waiting, busy = session.execute(_waiting_and_busy(), {"queue": queue}).one()
    if not any_waiting:
        return None
    capacity = _live_slots(session, queue, settings) + settings.dispatch_buffer
    return capacity if capacity > busy else None


def _seconds(session: Session, start: Any, end: Any) -> Any:
    """``end - start`` in seconds, as SQL (both dialects)."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def _usage(
    session: Session, queue: str, tenants: list[str], settings: Settings
) -> tuple[dict[str, float], dict[str, int], float]:
    """Each tenant's recent GPU-seconds on the queue and its jobs in flight there, and the charge of one job.

    The finished part comes from ``db.gpu_seconds`` (a few rows per tenant, however busy the queue), the
    in-flight part from the jobs in flight (at most the queue's capacity)."""
    done = gpu_seconds.recent(session, queue, tenants, settings.fair_share_window_seconds)
    now = clock.now(session)
    running = session.execute(
        select(Job.tenant_id, func.sum(_seconds(session, func.coalesce(Job.started_at, now), now)), func.count())
        .where(Job.queue == queue, Job.tenant_id.in_(tenants), _IN_FLIGHT)
        .group_by(Job.tenant_id)
    ).all()
    done_seconds = sum(seconds for seconds, _ in done.values())
    done_jobs = sum(jobs for _, jobs in done.values())
    # What one more job of this queue is expected to use: the mean of its tenants' recent jobs.
    charge = done_seconds / done_jobs if done_jobs else DEFAULT_CHARGE
    usage = {tenant: done.get(tenant, (0.0, 0))[0] for tenant in tenants}
    in_flight = dict.fromkeys(tenants, 0)
    for tenant_id, running_seconds, count in running:
        # A job in flight counts as at least one expected job until it ends and its real time replaces it.
        usage[tenant_id] += max(float(running_seconds or 0), charge * int(count))
        in_flight[tenant_id] = int(count)
    return usage, in_flight, charge


def _pick(session: Session, queue: str, settings: Settings, capacity: int) -> list[str]:
    """The ids of the next jobs to send, in order: fair share between tenants, then priority, then age."""
    # Each tenant's first jobs, with the queue's in-flight count (after the lock) and its quota row.
    rows = session.execute(_candidates(), {"queue": queue, "capacity": capacity}).all()
    free = capacity - rows[0].busy if rows else 0
    if free <= 0:
        return []
    candidates: dict[str, list[tuple[str, datetime]]] = {}
    limits: dict[str, quotas.Quotas] = {}
    for row in rows:
        candidates.setdefault(row.tenant_id, []).append((row.id, row.created_at))
        if row.tenant_id not in limits:
            limits[row.tenant_id] = quotas.merge(row, settings)
    waiting = sum(len(jobs) for jobs in candidates.values())
    capped = any(limits[tenant].max_running_jobs for tenant in candidates)
    if not capped and (len(candidates) == 1 or waiting <= free):
        # No competition (one tenant, or a slot for every job) and no cap: no usage to read; each tenant's
        # jobs in its own order (priority, then age).
        return [job_id for jobs in candidates.values() for job_id, _ in jobs][:free]
    usage, in_flight, charge = _usage(session, queue, list(candidates), settings)

    turns = [_Turn(usage[t] / limits[t].weight, jobs[0][1], t) for t, jobs in candidates.items()]
    heapq.heapify(turns)
    picked: list[str] = []
    while turns and len(picked) < free:
        turn = heapq.heappop(turns)
        tenant = turn.tenant_id
        cap = limits[tenant].max_running_jobs
        if cap and in_flight[tenant] >= cap:
            continue  # at its running-jobs quota on this queue: the others share the slots
        jobs = candidates[tenant]
        picked.append(jobs.pop(0)[0])
        in_flight[tenant] += 1
        if jobs:
            heapq.heappush(turns, _Turn(turn.share + charge / limits[tenant].weight, jobs[0][1], tenant))
    return picked
