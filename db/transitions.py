"""The job state machine: the only code that changes a job's status.

Every transition is one conditional UPDATE (``... WHERE id = :id AND status = ...``)
plus the event that records it, in the caller's transaction. A caller that loses a
race gets ``False``/``None`` and does nothing, which is what makes duplicate broker
messages, cancels and the reconciler safe to run at the same time.

A running job is fenced by its attempt number: a worker acts on the job only while
``status = 'running' AND attempts = <the attempt it claimed>``, so a worker that lost
its lease (and whose job was requeued and claimed again) cannot touch the new run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, insert, select, update
from sqlalchemy.orm import Session

from db.models import EventKind, Job, JobEvent, JobStatus, utcnow


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
    at: datetime | None = None,
) -> None:
    session.execute(
        insert(JobEvent).values(
            job_id=job_id, kind=kind.value, attempt=attempt, message=message, data=data, at=at or utcnow()
        )
    )


def _update(session: Session, job_id: str, *conditions: Any, **values: Any) -> bool:
    result = session.execute(
        update(Job).where(Job.id == job_id, *conditions).values(**values).execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def _running(attempt: int) -> tuple[Any, ...]:
    return (Job.status == JobStatus.RUNNING.value, Job.attempts == attempt)


def create(session: Session, job: Job) -> Job:
    """Insert a new queued job and its first event (the caller commits, then dispatches)."""
    job.status = JobStatus.QUEUED
    job.created_at = job.created_at or utcnow()
    session.add(job)
    session.flush()
    record_event(session, job.id, EventKind.QUEUED, 0, at=job.created_at)
    return job


def mark_dispatched(session: Session, job_id: str, *, redispatch: bool = False) -> bool:
    """Record that a broker message for the job was sent."""
    done = _update(session, job_id, Job.status == JobStatus.QUEUED.value, dispatched_at=utcnow())
    if done and redispatch:
        record_event(session, job_id, EventKind.DISPATCHED, _attempts(session, job_id), "dispatched by the reconciler")
    return done


def claim(session: Session, job_id: str, worker_id: str, lease_seconds: float) -> Claim | None:
    """queued → running, with a lease. ``None`` if another worker has it or it is no longer queued."""
    now = utcnow()
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(
            status=JobStatus.RUNNING.value,
            attempts=Job.attempts + 1,
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
            progress={},
        )
        .returning(Job.attempts)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    attempt = row[0]
    record_event(session, job_id, EventKind.CLAIMED, attempt, f"claimed by {worker_id}", at=now)
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return Claim(job=job, attempt=attempt)


def renew_lease(
    session: Session, job_id: str, attempt: int, lease_seconds: float, progress: dict[str, Any] | None = None
) -> LeaseState:
    """Extend a running job's lease (and save its progress); tells whether a cancel was asked."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_seconds)}
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
    return LeaseState(owned=True, cancel_requested=row[0] is not None)


def progress_milestone(session: Session, job_id: str, attempt: int, message: str, data: dict[str, Any]) -> None:
    """Record a progress milestone (a new stage) in the job's timeline."""
    record_event(session, job_id, EventKind.PROGRESS, attempt, message, data)


def stored(session: Session, job_id: str, attempt: int, names: list[str]) -> None:
    record_event(session, job_id, EventKind.STORED, attempt, f"{len(names)} artifact(s) stored", {"names": names})


def succeed(session: Session, job_id: str, attempt: int, output: dict[str, Any], progress: dict[str, Any]) -> bool:
    now = utcnow()
    done = _update(
        session,
        job_id,
        *_running(attempt),
        status=JobStatus.SUCCEEDED.value,
        output=output,
        progress=progress,
        finished_at=now,
        lease_expires_at=None,
    )
    if done:
        record_event(session, job_id, EventKind.SUCCEEDED, attempt, at=now)
    return done


def fail(
    session: Session, job_id: str, attempt: int, code: str, message: str, traceback: str | None = None
) -> bool:
    """running → failed, by the worker that runs it."""
    now = utcnow()
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
    return done


def request_cancel(session: Session, job_id: str) -> JobStatus:
    """Ask a job to stop: a queued job is canceled at once, a running one is flagged.

    Returns the status the job has afterwards; raises ``TransitionError`` if it had already finished.
    """
    now = utcnow()
    if _update(
        session, job_id, Job.status == JobStatus.QUEUED.value, status=JobStatus.CANCELED.value, finished_at=now
    ):
        record_event(session, job_id, EventKind.CANCELED, _attempts(session, job_id), "canceled before it ran", at=now)
        return JobStatus.CANCELED
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


def cancel(session: Session, job_id: str, attempt: int, message: str = "stopped at the client's request") -> bool:
    """running → canceled, by the worker that saw the cancel flag (or the reconciler for a dead one)."""
    now = utcnow()
    done = _update(
        session, job_id, *_running(attempt), status=JobStatus.CANCELED.value, finished_at=now, lease_expires_at=None
    )
    if done:
        record_event(session, job_id, EventKind.CANCELED, attempt, message, at=now)
    return done


def requeue(session: Session, job_id: str, attempt: int, reason: str) -> bool:
    """running (lease expired) → queued, so another worker can run it."""
    done = _update(
        session,
        job_id,
        *_running(attempt),
        Job.lease_expires_at < utcnow(),
        status=JobStatus.QUEUED.value,
        worker_id=None,
        lease_expires_at=None,
        dispatched_at=None,
    )
    if done:
        record_event(session, job_id, EventKind.REQUEUED, attempt, reason)
    return done


def give_up(session: Session, job_id: str, attempt: int, message: str) -> bool:
    """running (lease expired, attempts used up) → failed."""
    now = utcnow()
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
    return done


def expired_leases(session: Session, limit: int = 500) -> list[Job]:
    return list(
        session.scalars(
            select(Job)
            .where(and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < utcnow()))
            .limit(limit)
        )
    )


def undispatched(session: Session, grace_seconds: float, redispatch_seconds: float, limit: int = 500) -> list[Job]:
    """Queued jobs whose message was never sent (after a grace period) or was presumably lost."""
    now = utcnow()
    never_sent = and_(Job.dispatched_at.is_(None), Job.created_at < now - timedelta(seconds=grace_seconds))
    lost = Job.dispatched_at < now - timedelta(seconds=redispatch_seconds)
    return list(
        session.scalars(
            select(Job)
            .where(Job.status == JobStatus.QUEUED.value, never_sent | lost)
            .order_by(Job.created_at)
            .limit(limit)
        )
    )


def _attempts(session: Session, job_id: str) -> int:
    return session.execute(select(Job.attempts).where(Job.id == job_id)).scalar_one()
