"""Runs one job: claim → run → store → record. The Celery task is a thin shell around ``execute``."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable

from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from db import logs, tracing, transitions
from db.models import Job, JobStatus
from db.session import session_scope
from db.settings import get_settings
from db.storage import StorageError
from worker import dispatcher, heartbeat, metrics
from worker.celery_app import dispatch
from worker.context import Canceled, DeadlineExceeded, HandBack, JobContext, JobError, LeaseLost, StorageGaveUp
from worker.drain import DRAIN
from worker.jobs import get_job_type

log = logging.getLogger(__name__)

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def name_worker(node: str) -> None:
    """Use the Celery node name (``name@host``) in this process's id, so operators recognise it."""
    global WORKER_ID
    WORKER_ID = f"{node}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def worker_id() -> str:
    # Recomputed after a fork so that each process has its own identity.
    global WORKER_ID
    if f":{os.getpid()}:" not in WORKER_ID:
        WORKER_ID = f"{WORKER_ID.split(':')[0]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    return WORKER_ID


def execute(job_id: str) -> str:
    """Run the job if this worker can claim it; returns what happened (for logs and tests).

    Every line logged meanwhile (by this thread and the job's control thread) names the job and, once
    claimed, the attempt (``db.logs``)."""
    with logs.bound(job_id=job_id, attempt=None), contextlib.ExitStack() as spans:
        return _execute(job_id, spans)


def _execute(job_id: str, spans: contextlib.ExitStack) -> str:
    settings = get_settings()
    me = worker_id()
    if DRAIN.active:  # a message taken just before the drain began: not this worker's any more
        return _send_back_unclaimed(job_id)
    claimed_at = tracing.now_ns()
    with session_scope() as session:
        claim = transitions.claim(session, job_id, me, settings.lease_seconds)
    if claim is None:
        log.info("job %s not claimed (already taken, finished or unknown)", job_id)
        return "not_claimed"

    job, attempt = claim.job, claim.attempt
    logs.attempt.set(attempt)  # until execute's block ends
    # The attempt's span (until execute returns), a child of the submitting request's: one job, one trace.
    where = {"job_id": job_id, "attempt": attempt, "type": job.type, "worker": me}
    spans.enter_context(tracing.span("job.attempt", job.traceparent, claimed_at, **where))
    with tracing.span("job.claim", start_time=claimed_at):
        pass
    began = time.monotonic()
    if job.started_at is not None:
        metrics.QUEUE_WAIT.labels(job.type).observe(max((job.started_at - job.created_at).total_seconds(), 0.0))

    def finish(outcome: str, transition: Callable[[Session], bool], code: str = "") -> str:
        ended = _finish(job_id, outcome, transition, freed=job.queue)
        if ended == outcome:  # recorded by this attempt (not moved on without it)
            metrics.job_finished(job.type, job.queue, outcome, code, time.monotonic() - began)
        return ended

    job_type = get_job_type(job.type, settings)
    ctx = JobContext(
        job_id=job_id,
        attempt=attempt,
        tenant_id=job.tenant_id,
        worker_id=me,
        deadline_seconds=job.deadline_seconds,
        settings=settings,
        progress_webhooks=bool(job.webhook) and "progress" in (job.webhook_events_filter or []),
    )
    log.info("job %s (%s) attempt %d started on %s", job_id, job.type, attempt, me)
    ctx.start()
    heartbeat.job_started(job_id)
    DRAIN.started(ctx)
    try:
        if job_type is None:
            raise JobError(f"this worker does not know the job type {job.type!r}", "unknown_type")
        params = job_type.Input.model_validate(job.input)
        with tracing.span("job.inference", type=job.type):
            output = job_type.runner()(ctx, params)
        # A cancel that arrived during the last step still wins over success; a store in that step needs no
        # fenced read here: the success is fenced by its own UPDATE (a stale attempt records nothing).
        ctx.check(fence=False)
        result = output.model_dump(mode="json")
    except Canceled:
        stopped_at = ctx.snapshot()  # the step it stopped at, not the last one the control thread saved
        return finish("canceled", lambda s: transitions.cancel(s, job_id, attempt, progress=stopped_at))
    except HandBack:
        return _hand_back(job_id, attempt, job.queue, ctx.snapshot())
    except LeaseLost:
        log.warning("job %s attempt %d: lease lost, leaving it to its new owner", job_id, attempt)
        return "lease_lost"
    except DeadlineExceeded:
        message = f"The job ran longer than its deadline of {job.deadline_seconds:g} seconds and was stopped."
        return finish(
            "failed", lambda s: transitions.fail(s, job_id, attempt, "deadline_exceeded", message), "deadline_exceeded"
        )
    except ValidationError as exc:
        message = f"The job's input is no longer valid for this worker: {exc.errors()[0]['msg']}"
        return finish(
            "failed", lambda s: transitions.fail(s, job_id, attempt, "invalid_input", message), "invalid_input"
        )
    except JobError as exc:
        code, message, tb = exc.code, exc.message, traceback.format_exc()
        return finish("failed", lambda s: transitions.fail(s, job_id, attempt, code, message, tb), code)
    except StorageError as exc:
        log.exception("job %s: storage failed", job_id)
        message = _storage_message(exc)
        tb = f"{traceback.format_exc()}\n{exc}"
        return finish(
            "failed", lambda s: transitions.fail(s, job_id, attempt, "storage_error", message, tb), "storage_error"
        )
    except Exception:
        log.exception("job %s failed", job_id)
        message = "The job failed because of an internal error in the worker; operators can see the details."
        tb = traceback.format_exc()
        return finish(
            "failed", lambda s: transitions.fail(s, job_id, attempt, "internal_error", message, tb), "internal_error"
        )
    finally:
        DRAIN.ended(ctx)
        ctx.close()
        heartbeat.job_ended(job_id)

    progress = ctx.snapshot()
    if progress.get("total"):
        progress.update(step=progress["total"], fraction=1.0)

    def succeed(session: Session) -> bool:
        return transitions.succeed(session, job_id, attempt, result, progress, list(ctx.stored.values()), ctx.models)

    return finish("succeeded", succeed)


def _hand_back(job_id: str, attempt: int, queue: str, progress: dict[str, object]) -> str:
    """The draining worker gives the job back: queued again (fenced by the attempt), its message sent now.

    A cancel asked meanwhile wins: the job is canceled instead of queued."""
    reason = f"attempt {attempt} handed back by {worker_id()} (the worker is shutting down); requeued"

    def give_back(session: Session) -> bool:
        if transitions.hand_back(session, job_id, attempt, reason, progress):
            return True
        return transitions.owns(session, job_id, attempt) and transitions.cancel(
            session, job_id, attempt, progress=progress
        )

    outcome = _finish(job_id, "handed_back", give_back)
    if outcome != "handed_back":
        return outcome
    with session_scope() as session:
        status = session.get(Job, job_id).status  # type: ignore[union-attr]
    if status != JobStatus.QUEUED.value:
        return status  # the cancel won
    _send(job_id, queue)
    return outcome


def _send_back_unclaimed(job_id: str) -> str:
    """A draining worker got a job's message: leave the job to another worker (send its message again)."""
    with session_scope() as session:
        row = session.get(Job, job_id)
        queued = row is not None and row.status == JobStatus.QUEUED.value
        queue = row.queue if row is not None else ""
    if queued:
        _send(job_id, queue)
    log.info("job %s left to another worker (this one is draining)", job_id)
    return "draining"


def _send(job_id: str, queue: str) -> None:
    try:
        dispatch(job_id, queue)
    except Exception as exc:  # the broker is away: the reconciler sends it (it looks again once it is old)
        log.warning("job %s: could not send it back to %s (%s); the reconciler will", job_id, queue, exc)
        with session_scope() as session:
            transitions.undo_dispatch(session, job_id)


def _storage_message(exc: StorageError) -> str:
    """What a user reads when storage failed the job (operators read the traceback)."""
    if isinstance(exc, StorageGaveUp):
        return (
            f"The job ran, but its outputs could not be stored: the object storage was unavailable for "
            f"{exc.seconds:g} seconds (storage_retry_window_seconds). Submit the job again once storage is back; "
            "operators can see the storage error."
        )
    return (
        "The job could not read or store an object in the object storage (a missing object, or storage "
        "refusing the request). Submit it again; if it fails the same way, operators can see the details."
    )


def _finish(job_id: str, outcome: str, transition: Callable[[Session], bool], freed: str | None = None) -> str:
    """Record how the job ended (retrying while the database is away); then, if the job frees a slot of
    queue ``freed``, run a dispatch pass on it so the next job is sent at once."""
    # The database may be away at the moment the job ends: try again while this attempt's lease could
    # still hold (the transition is fenced by attempt, so a late success after a requeue changes nothing).
    deadline = time.monotonic() + get_settings().lease_seconds
    delay = 0.25
    while True:
        try:
            with session_scope() as session:
                done = transition(session)
            break
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("job %s: could not record %s yet (%s); retrying", job_id, outcome, type(exc).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    if not done:
        log.warning("job %s: could not record %s (the job moved on without this worker)", job_id, outcome)
        return "lease_lost"
    log.info("job %s %s", job_id, outcome)
    if freed is not None:
        dispatcher.dispatch_soon(freed)
    return outcome
