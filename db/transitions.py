"""The job state machine: the only code that changes a job's status.

Every transition is one conditional UPDATE (``... WHERE id = :id AND status = ...``)
plus the event that records it, in the caller's transaction. A caller that loses a
race gets ``False``/``None`` and does nothing, which is what makes duplicate broker
messages, cancels and the reconciler safe to run at the same time.

A running job is fenced by its attempt number: a worker acts on the job only while
``status = 'running' AND attempts = <the attempt it claimed>``, so a worker that lost
its lease (and whose job was requeued and claimed again) cannot touch the new run.

Webhook deliveries are written here too, in the transition's transaction: ``start`` with the
first claim, ``completed`` with whichever terminal transition wins. However often a job is
redelivered it gets one of each (one more ``completed`` after each operator ``retry``), and
none is lost if a process dies after the commit.

Every time these functions write or compare (leases, dispatch ages, event and finish times) is the
database's (``db.clock``), computed in the statement itself: hosts whose clocks disagree still agree on
when a lease runs out.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Interval,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    select,
    type_coerce,
    update,
)
from sqlalchemy.orm import Session

from db import clock, notify, webhooks
from db.models import Artifact, EventKind, Job, JobEvent, JobStatus, Model, UTCDateTime, WebhookEvent, new_id
from db.settings import Settings

# The tables behind the models, for Core statements (the hot paths skip the ORM's unit of work).
JOBS = cast(Table, Job.__table__)
EVENTS = cast(Table, JobEvent.__table__)
ARTIFACTS = cast(Table, Artifact.__table__)
MODELS = cast(Table, Model.__table__)


class TransitionError(Exception):
    """A transition that the job's current state does not allow (e.g. cancel of a finished job)."""


@dataclass(frozen=True)
class Claim:
    job: Job
    attempt: int


@dataclass(frozen=True)
class LeaseState:
    owned: bool
    cancel_requested: bool


def record_event(
    session: Session,
    job_id: str,
    kind: EventKind,
    attempt: int,
    message: str | None = None,
    data: dict[str, Any] | None = None,
    at: datetime | ColumnElement[datetime] | None = None,
) -> None:
    """Append an event to the job's timeline, at ``at`` (default: now on the database's clock)."""
    when = clock.now(session) if at is None else at
    session.execute(
        insert(EVENTS).values(job_id=job_id, kind=kind.value, attempt=attempt, message=message, data=data, at=when)
    )
    if kind is not EventKind.QUEUED:  # nobody streams a job before its first event: the submit publishes nothing
        notify.changed_after_commit(session, job_id)


def _update(session: Session, job_id: str, *conditions: Any, **values: Any) -> bool:
    result = cast(
        CursorResult[Any], session.execute(update(JOBS).where(Job.id == job_id, *conditions).values(**values))
    )
    return result.rowcount == 1


def _finished(session: Session, job_id: str, target: tuple[Any, Any] | None = None) -> None:
    """The job reached its final status: record its ``completed`` webhook, if it has one, in the same
    transaction, and wake whoever waits for it (``Prefer: wait``) once that transaction commits.
    ``target``: the job's webhook and filter, when the caller's UPDATE returned them."""
    webhooks.job_event(session, job_id, WebhookEvent.COMPLETED, target)
    notify.after_commit(session, job_id)


def _running(attempt: Any) -> tuple[Any, ...]:
    return (Job.status == JobStatus.RUNNING.value, Job.attempts == attempt)


def create(session: Session, job: Job) -> Job:
    """Insert a new queued job and its first event (the caller commits, then dispatches).

    ``created_at`` (unless given) is the database's time; the job waits (``dispatched_at`` NULL) until a
    dispatch pass sends it (``worker.dispatcher``); one given a ``dispatched_at`` is marked sent at that time.
    """
    # A Core INSERT, not the ORM unit of work: submission is the API's hot path.
    job.id = job.id or new_id("job")
    job.status = JobStatus.QUEUED.value
    job.meta = job.meta if job.meta is not None else {}
    job.progress = job.progress or {}
    job.attempts = job.attempts or 0
    # An absent webhook_events_filter takes the column's default (["completed"]) in the INSERT.
    columns = {
        attr.columns[0].name: getattr(job, attr.key)
        for attr in Job.__mapper__.column_attrs
        if getattr(job, attr.key) is not None
    }
    dialect = session.get_bind().dialect.name
    statement = _insert_job(dialect, tuple(sorted(columns)))
    params = {f"p_{name}": value for name, value in columns.items()}
    if dialect == "postgresql":
        job.created_at, job.dispatched_at = session.execute(statement, params).one()
        return job
    _, job.created_at, job.dispatched_at = session.execute(statement, params).one()
    record_event(session, job.id, EventKind.QUEUED, 0, at=job.created_at)
    return job


@functools.lru_cache(maxsize=64)
def _insert_job(dialect: str, names: tuple[str, ...]) -> Any:
    """The INSERT of a job with these columns given (bound as ``p_<column>``), built once per column set: a
    submit's hot path, where building the statement cost more CPU than running it.

    ``created_at`` (unless given) is the database's time, and so is a given ``dispatched_at``. On
    PostgreSQL, one round trip for the job and its first event: the INSERT of the job as a data-modifying
    CTE, the event's INSERT … SELECT reading its id and created_at."""
    values: dict[str, Any] = {name: bindparam(f"p_{name}", type_=JOBS.c[name].type) for name in names}
    when = clock.now_on(dialect)
    values.setdefault("created_at", when)
    if "dispatched_at" in values:
        values["dispatched_at"] = when
    row = insert(JOBS).values(**values).returning(JOBS.c.id, JOBS.c.created_at, JOBS.c.dispatched_at)
    if dialect != "postgresql":
        return row
    job_row = row.cte("new_job")
    queued = select(job_row.c.id, literal(EventKind.QUEUED.value), literal(0), job_row.c.created_at)
    return (
        insert(EVENTS)
        .from_select(["job_id", "kind", "attempt", "at"], queued)
        .returning(EVENTS.c.at, select(job_row.c.dispatched_at).scalar_subquery())
    )


@functools.cache
def _claim_on_postgres() -> Any:
    """PostgreSQL's claim in one statement, built once (bind parameters ``job_id``, ``worker_id``, ``lease``,
    ``message``): the UPDATE as a data-modifying CTE returning the row, a second CTE inserting the claimed
    event from that row (nothing when the job was not queued), the row selected as a ``Job``. Building a
    CTE over every column costs more CPU than the round trip it saves, so it is not rebuilt per claim."""
    now = type_coerce(func.now(), UTCDateTime())
    taken = (
        update(JOBS)
        .where(JOBS.c.id == bindparam("job_id"), JOBS.c.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.RUNNING.value,
            attempts=JOBS.c.attempts + 1,
            worker_id=bindparam("worker_id"),
            lease_expires_at=type_coerce(func.now() + bindparam("lease", type_=Interval()), UTCDateTime()),
            started_at=now,
            progress={},
        )
        .returning(*JOBS.c)
        .cte("claimed")
    )
    message = bindparam("message", type_=EVENTS.c.message.type)
    event = select(taken.c.id, literal(EventKind.CLAIMED.value), taken.c.attempts, message, taken.c.started_at)
    recorded = insert(EVENTS).from_select(["job_id", "kind", "attempt", "message", "at"], event).cte("claimed_event")
    return select(Job).from_statement(select(taken).add_cte(recorded))


def claim(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> Claim | None:
    """queued → running, with a lease. ``None`` if another worker has it or it is no longer queued."""
    message = f"claimed by {worker_id}"
    options = {"populate_existing": True}
    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:  # one round trip: the UPDATE and the event's INSERT
        lease = timedelta(seconds=lease_seconds)
        params = {"job_id": job_id, "worker_id": worker_id, "lease": lease, "message": message}
        job = session.scalars(_claim_on_postgres(), params, execution_options=options).first()
    else:
        job = session.scalars(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
            .values(
                status=JobStatus.RUNNING.value,
                attempts=Job.attempts + 1,
                worker_id=worker_id,
                lease_expires_at=clock.now(session, lease_seconds),
                started_at=clock.now(session),
                progress={},
            )
            .returning(Job),  # the whole row: the runner needs no second read
            execution_options={"synchronize_session": False, **options},
        ).first()
    if job is None:
        return None
    attempt = job.attempts
    if postgres:
        notify.changed_after_commit(session, job_id)  # as record_event does
    else:
        record_event(session, job_id, EventKind.CLAIMED, attempt, message, at=job.started_at)
    # A job starts once, however often it is run; the claimed row tells whether it wants to hear it.
    if attempt == 1 and job.webhook and WebhookEvent.START.value in (job.webhook_events_filter or []):
        webhooks.job_event(session, job_id, WebhookEvent.START)
    return Claim(job=job, attempt=attempt)


def renew_lease(
    session: Session, job_id: str, attempt: int, lease_seconds: float, progress: dict[str, Any] | None = None
) -> LeaseState:
    """Extend a running job's lease (and save its progress); tells whether a cancel was asked."""
    values: dict[str, Any] = {"lease_expires_at": clock.now(session, lease_seconds)}
    if progress is not None:
        values["progress"] = progress
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, *_running(attempt))
        .values(**values)
        .returning(Job.cancel_requested_at)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return LeaseState(owned=False, cancel_requested=False)
    if progress is not None:
        notify.changed_after_commit(session, job_id)  # the job's event streams send the new progress
    return LeaseState(owned=True, cancel_requested=row[0] is not None)


def owns(session: Session, job_id: str, attempt: int) -> bool:
    """Whether ``attempt`` still runs the job (the fence, read without a write): a worker asks before and
    after it stores an output, so a stale attempt stops instead of working on."""
    return session.execute(_owns(), {"job_id": job_id, "attempt": attempt}).first() is not None


@functools.cache
def _owns() -> Any:
    """The fence of every store, built once."""
    return select(Job.id).where(Job.id == bindparam("job_id"), *_running(bindparam("attempt")))


def record_attempt_event(
    session: Session,
    job_id: str,
    kind: EventKind,
    attempt: int,
    message: str | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """Add an event to the timeline only while ``attempt`` runs the job (one INSERT … SELECT … WHERE EXISTS);
    False, and nothing written, for a stale attempt."""
    fence = select(Job.id).where(Job.id == job_id, *_running(attempt)).exists()
    row = select(
        literal(job_id, EVENTS.c.job_id.type),
        literal(kind.value, EVENTS.c.kind.type),
        literal(attempt, EVENTS.c.attempt.type),
        literal(message, EVENTS.c.message.type),
        literal(data, EVENTS.c.data.type),
        clock.now(session),
    ).where(fence)
    columns = ["job_id", "kind", "attempt", "message", "data", "at"]
    recorded = session.execute(insert(EVENTS).from_select(columns, row).returning(EVENTS.c.id)).first() is not None
    if recorded:
        notify.changed_after_commit(session, job_id)
    return recorded


def progress_milestone(session: Session, job_id: str, attempt: int, message: str, data: dict[str, Any]) -> bool:
    """Record a progress milestone (a new stage) in the job's timeline, if ``attempt`` still runs the job."""
    return record_attempt_event(session, job_id, EventKind.PROGRESS, attempt, message, data)


def succeed(
    session: Session,
    job_id: str,
    attempt: int,
    output: dict[str, Any],
    progress: dict[str, Any],
    artifacts: Sequence[dict[str, Any]] = (),
    models: Sequence[dict[str, Any]] = (),
) -> bool:
    """running → succeeded, with the rows of the artifacts (and models) this run stored (objects in S3 already).

    Fenced by the attempt like every worker transition: the artifact rows are replaced only together with the
    status change, so a stale attempt can never change what a finished job's artifacts point to (and each
    attempt stores under its own keys, ``jobs/<id>/<attempt>/…``, so neither can it change the objects)."""
    params = {"job_id": job_id, "attempt": attempt, "p_output": output, "p_progress": progress}
    finished = session.execute(_succeed(session.get_bind().dialect.name), params).first()
    if finished is None:
        return False
    now = finished[0]
    events: list[dict[str, Any]] = [{"kind": EventKind.SUCCEEDED.value, "message": None, "data": None}]
    if artifacts:
        if attempt > 1:  # rows are written by a success only, so a first attempt has none to replace
            session.execute(delete(ARTIFACTS).where(Artifact.job_id == job_id))
        session.execute(insert(ARTIFACTS), [{**a, "job_id": job_id, "created_at": now} for a in artifacts])
        names = [a["name"] for a in artifacts]
        stored = {
            "kind": EventKind.STORED.value,
            "message": f"{len(names)} artifact(s) stored",
            "data": {"names": names},
        }
        events.insert(0, stored)
    if models:
        session.execute(insert(MODELS), [{**m, "job_id": job_id, "created_at": now} for m in models])
    # The transition's events (stored, then succeeded) in one round trip (executemany), in timeline order.
    session.execute(insert(EVENTS), [{**e, "job_id": job_id, "attempt": attempt, "at": now} for e in events])
    _finished(session, job_id, (finished[1], finished[2]))
    return True


@functools.cache
def _succeed(dialect: str) -> Any:
    """The success's UPDATE, built once per dialect (every job's end)."""
    return (
        update(JOBS)
        .where(Job.id == bindparam("job_id"), *_running(bindparam("attempt")))
        .values(
            status=JobStatus.SUCCEEDED.value,
            output=bindparam("p_output", type_=JOBS.c.output.type),
            progress=bindparam("p_progress", type_=JOBS.c.progress.type),
            finished_at=clock.now_on(dialect),
            lease_expires_at=None,
        )
        # The time of its rows and events, and whom to tell: no second round trip to read them.
        .returning(JOBS.c.finished_at, JOBS.c.webhook, JOBS.c.webhook_events_filter)
    )


def fail(session: Session, job_id: str, attempt: int, code: str, message: str, traceback: str | None = None) -> bool:
    """running → failed, by the worker that runs it."""
    now = clock.now(session)
    done = _update(
        session,
        job_id,
        *_running(attempt),
        status=JobStatus.FAILED.value,
        error={"code": code, "message": message},
        traceback=traceback,
        finished_at=now,
        lease_expires_at=None,
    )
    if done:
        record_event(session, job_id, EventKind.FAILED, attempt, message, {"code": code}, at=now)
        _finished(session, job_id)
    return done


def request_cancel(session: Session, job_id: str) -> JobStatus:
    """Ask a job to stop: a queued job is canceled at once, a running one is flagged.

    Returns the status the job has afterwards; raises ``TransitionError`` if it had already finished.
    """
    if cancel_queued(session, job_id):
        return JobStatus.CANCELED
    now = clock.now(session)
    if _update(
        session,
        job_id,
        Job.status == JobStatus.RUNNING.value,
        Job.cancel_requested_at.is_(None),
        cancel_requested_at=now,
    ):
        record_event(session, job_id, EventKind.CANCEL_REQUESTED, _attempts(session, job_id), at=now)
        return JobStatus.RUNNING
    status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
    if JobStatus(status).finished:
        raise TransitionError(f"it has already finished ({status})")
    return JobStatus(status)  # running, cancel already requested


def cancel_queued(session: Session, job_id: str, message: str = "canceled before it ran") -> bool:
    """queued → canceled (a job that has started is left alone): single cancels and the bulk cancel."""
    now = clock.now(session)
    done = _update(
        session, job_id, Job.status == JobStatus.QUEUED.value, status=JobStatus.CANCELED.value, finished_at=now
    )
    if done:
        record_event(session, job_id, EventKind.CANCELED, _attempts(session, job_id), message, at=now)
        _finished(session, job_id)
    return done


def cancel(
    session: Session,
    job_id: str,
    attempt: int,
    message: str = "stopped at the client's request",
    progress: dict[str, Any] | None = None,
) -> bool:
    """running → canceled, by the worker that saw the cancel flag (with the progress it stopped at), or the
    reconciler for a dead one."""
    now = clock.now(session)
    values: dict[str, Any] = {"status": JobStatus.CANCELED.value, "finished_at": now, "lease_expires_at": None}
    if progress is not None:
        values["progress"] = progress
    done = _update(session, job_id, *_running(attempt), **values)
    if done:
        record_event(session, job_id, EventKind.CANCELED, attempt, message, at=now)
        _finished(session, job_id)
    return done


def requeue(session: Session, job_id: str, attempt: int, reason: str) -> bool:
    """running (lease expired) → queued, so another worker can run it."""
    done = _update(
        session,
        job_id,
        *_running(attempt),
        Job.lease_expires_at < clock.now(session),
        status=JobStatus.QUEUED.value,
        worker_id=None,
        lease_expires_at=None,
        dispatched_at=None,
    )
    if done:
        record_event(session, job_id, EventKind.REQUEUED, attempt, reason)
    return done


def hand_back(session: Session, job_id: str, attempt: int, reason: str, progress: dict[str, Any] | None = None) -> bool:
    """running → queued by the worker that runs it (a draining worker gives the job up at once, without
    waiting for its lease to expire). Fenced by the attempt, so a stale attempt cannot requeue a newer run.

    ``dispatched_at`` is set now: the caller sends the message right after the commit (``undo_dispatch`` if
    that fails, and the reconciler sends it). ``max_attempts`` grows by one: giving a job back on purpose is
    not a lost worker, so it does not eat the job's budget against those.
    """
    values: dict[str, Any] = {
        "status": JobStatus.QUEUED.value,
        "worker_id": None,
        "lease_expires_at": None,
        "dispatched_at": clock.now(session),
        "max_attempts": Job.max_attempts + 1,
    }
    if progress is not None:
        values["progress"] = progress
    done = _update(session, job_id, *_running(attempt), Job.cancel_requested_at.is_(None), **values)
    if done:
        record_event(session, job_id, EventKind.REQUEUED, attempt, reason, {"handed_back": True})
    return done


def retry(session: Session, job_id: str, attempts: int, by: str) -> bool:
    """failed or canceled → queued: an operator runs the job again, as its next attempt.

    The last run's error, traceback, output and progress are cleared from the row; the
    ``retried`` event keeps the error and traceback, so the timeline still says why it failed.
    ``max_attempts`` becomes the attempts used so far plus ``attempts``: the new run has the
    same budget against lost workers as a new job. ``dispatched_at`` is cleared: the job waits for the
    scheduler (the caller runs a dispatch pass after the commit).
    The events (and with them the previous traceback) are shown to operators only.
    """
    before = session.execute(select(Job.status, Job.attempts, Job.error, Job.traceback).where(Job.id == job_id)).first()
    if before is None or before.status not in (JobStatus.FAILED.value, JobStatus.CANCELED.value):
        return False
    done = _update(
        session,
        job_id,
        Job.status == before.status,
        Job.attempts == before.attempts,
        status=JobStatus.QUEUED.value,
        error=None,
        traceback=None,
        output=None,
        progress={},
        started_at=None,
        finished_at=None,
        worker_id=None,
        lease_expires_at=None,
        cancel_requested_at=None,
        dispatched_at=None,
        max_attempts=Job.attempts + attempts,
    )
    if done:
        data = {"previous_status": before.status, "previous_error": before.error, "traceback": before.traceback}
        record_event(session, job_id, EventKind.RETRIED, before.attempts, f"retried by {by}", data)
    return done


def give_up(session: Session, job_id: str, attempt: int, message: str) -> bool:
    """running (lease expired, attempts used up) → failed."""
    now = clock.now(session)
    done = _update(
        session,
        job_id,
        *_running(attempt),
        Job.lease_expires_at < now,
        status=JobStatus.FAILED.value,
        error={"code": "worker_lost", "message": message},
        finished_at=now,
        lease_expires_at=None,
    )
    if done:
        record_event(session, job_id, EventKind.FAILED, attempt, message, {"code": "worker_lost"}, at=now)
        _finished(session, job_id)
    return done


def expired_leases(session: Session, limit: int = 500) -> list[Job]:
    """Running jobs whose lease ran out (on the database's clock)."""
    expired = and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < clock.now(session))
    return list(session.scalars(select(Job).where(expired).limit(limit)))


@dataclass(frozen=True)
class Expiry:
    at: datetime  # when the earliest lease runs out
    now: datetime  # the database's time when it was read


def next_lease_expiry(session: Session, within_seconds: float) -> Expiry | None:
    """The earliest expiry of a running job's lease in the next ``within_seconds``, with the database's time
    it was read at (so a caller measures the wait on the database's clock); None: no lease expires then."""
    now = clock.now(session)
    found = session.execute(
        select(func.min(Job.lease_expires_at), now).where(
            and_(
                Job.status == JobStatus.RUNNING.value,
                Job.lease_expires_at >= now,
                Job.lease_expires_at < clock.now(session, within_seconds),
            )
        )
    ).one()
    return None if found[0] is None else Expiry(at=found[0], now=found[1])


def mark_dispatched(
    session: Session, job_ids: Sequence[str], by: str | None = None, silent: Collection[str] = ()
) -> set[str]:
    """Take the right to send these waiting jobs (queued, never sent): the scheduler's pick, one UPDATE.

    With ``by``, each job marked but those in ``silent`` (the one whose submit runs the pass) also gets its
    ``dispatched`` event here, in the same transaction (one multi-row INSERT, at the mark's time): before
    the message is sent, so that it precedes the worker's ``claimed`` on the timeline, and with no
    transaction of its own. A send that fails takes it back (``undo_dispatch``).

    Returns the ids marked; one that another pass sent, or that was canceled meanwhile, is left out."""
    if not job_ids:
        return set()
    marked = session.execute(_mark(session.get_bind().dialect.name), {"ids": list(job_ids)}).all()
    if by is not None:
        message = f"dispatched by {by}"
        events = [
            {"job_id": job_id, "kind": EventKind.DISPATCHED.value, "attempt": attempts, "message": message, "at": at}
            for job_id, attempts, at in marked
            if job_id not in silent
        ]
        if events:
            session.execute(insert(EVENTS), events)  # executemany: one round trip
    return {row[0] for row in marked}


@functools.cache
def _mark(dialect: str) -> Any:
    """The dispatch mark, built once per dialect (every pass that sends)."""
    waiting = and_(Job.status == JobStatus.QUEUED.value, Job.dispatched_at.is_(None))
    return (
        update(JOBS)
        .where(Job.id.in_(bindparam("ids", expanding=True)), waiting)
        .values(dispatched_at=clock.now_on(dialect))
        .returning(JOBS.c.id, JOBS.c.attempts, JOBS.c.dispatched_at)
    )


def _lost_message(session: Session, settings: Settings, idle_queues: Collection[str]) -> Any:
    """Queued and sent, but its message is presumed lost: sent long ago (``redispatch_seconds``), or a while
    ago (``lost_message_seconds``) while its queue in the broker is empty (so no message waits for it).
    Ages on the database's clock. (A job never sent waits for the scheduler: ``worker.dispatcher``.)"""
    lost = Job.dispatched_at < clock.now(session, -settings.redispatch_seconds)
    vanished = and_(
        Job.dispatched_at < clock.now(session, -settings.lost_message_seconds), Job.queue.in_(list(idle_queues))
    )
    return and_(Job.status == JobStatus.QUEUED.value, lost | vanished)


def lost_messages(session: Session, settings: Settings, idle_queues: Collection[str], limit: int = 500) -> list[Job]:
    """Queued jobs sent whose message was lost (see ``_lost_message``)."""
    condition = _lost_message(session, settings, idle_queues)
    return list(session.scalars(select(Job).where(condition).order_by(Job.created_at).limit(limit)))


def claim_resend(session: Session, job_id: str, settings: Settings, idle_queues: Collection[str]) -> bool:
    """Take the right to send a lost job's message again, so two reconcilers never both send it."""
    condition = _lost_message(session, settings, idle_queues)
    return _update(session, job_id, condition, dispatched_at=clock.now(session))


def undo_dispatch(session: Session, *job_ids: str) -> None:
    """The send failed: the jobs wait again (the next dispatch pass sends them), and the ``dispatched`` event
    that ``mark_dispatched`` recorded for this send (the one at the job's ``dispatched_at``) is taken back."""
    sent_at = select(Job.dispatched_at).where(Job.id == JobEvent.job_id).scalar_subquery()
    session.execute(
        delete(EVENTS).where(
            JobEvent.job_id.in_(job_ids), JobEvent.kind == EventKind.DISPATCHED.value, JobEvent.at == sent_at
        )
    )
    session.execute(
        update(JOBS).where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED.value).values(dispatched_at=None)
    )


def dispatched_by_reconciler(session: Session, job_id: str) -> None:
    record_event(session, job_id, EventKind.DISPATCHED, _attempts(session, job_id), "dispatched by the reconciler")


def _attempts(session: Session, job_id: str) -> int:
    return session.execute(select(Job.attempts).where(Job.id == job_id)).scalar_one()
