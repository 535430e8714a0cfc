"""A running job's checkpoints as events on its timeline: recorded, found again after a requeue.

A checkpoint's bytes are stored under the job (``JobContext.checkpoint``); its event names the
object and the step. Recording one renews the attempt's lease in the same conditional UPDATE that
proves the attempt still owns the job, so a stale attempt can record nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import transitions
from db.models import EventKind, JobEvent


@dataclass(frozen=True)
class Checkpoint:
    step: int
    key: str
    attempt: int
    details: dict[str, Any]  # what the job stored with it (e.g. the key of its encoded training set)


def record(
    session: Session, job_id: str, attempt: int, lease_seconds: float, step: int, key: str, details: dict[str, Any]
) -> bool:
    """Record that the running attempt stored a checkpoint at ``key``, renewing its lease.

    False if the attempt no longer owns the job (nothing is recorded then)."""
    if not transitions.renew_lease(session, job_id, attempt, lease_seconds).owned:
        return False
    data = {"step": step, "key": key, **details}
    transitions.record_event(session, job_id, EventKind.CHECKPOINT, attempt, f"checkpoint at step {step}", data)
    return True


def latest(session: Session, job_id: str) -> Checkpoint | None:
    """The job's newest checkpoint, whichever attempt stored it."""
    row = session.execute(
        select(JobEvent.data, JobEvent.attempt)
        .where(JobEvent.job_id == job_id, JobEvent.kind == EventKind.CHECKPOINT.value)
        .order_by(JobEvent.id.desc())
        .limit(1)
    ).first()
    if row is None or not row.data:
        return None
    details = {k: v for k, v in row.data.items() if k not in ("step", "key")}
    return Checkpoint(step=int(row.data["step"]), key=str(row.data["key"]), attempt=row.attempt, details=details)


def resumed(session: Session, job_id: str, attempt: int, checkpoint: Checkpoint, load_seconds: float) -> bool:
    """A timeline milestone: this attempt continues from ``checkpoint`` (False, nothing written: it is stale)."""
    data = {
        "step": checkpoint.step,
        "key": checkpoint.key,
        "from_attempt": checkpoint.attempt,
        "load_seconds": load_seconds,
    }
    message = f"resumed from the checkpoint at step {checkpoint.step}"
    return transitions.record_attempt_event(session, job_id, EventKind.RESUMED, attempt, message, data)
