"""The reconciler (on beat): repairs what a crash or a lost message left behind.

- running jobs whose lease expired (their worker died) are requeued, or failed once
  they used up ``max_attempts``; a dead job whose cancel was asked is canceled;
- queued jobs whose message is presumed lost are sent again (a duplicate message is harmless:
  only one claim can win), and a dispatch pass runs on each job queue (``worker.dispatcher``), so
  jobs that wait while a slot is free (a failed send, a requeue, a broker that was down) are sent.

Beat runs it every ``reconcile_interval_seconds``; when a lease that has missed its renewals
will expire before the next beat, the run also schedules one reconcile for that moment
(``follow_up``), so a dead worker's job is requeued one lease after its last renewal, not up to
a beat period later.

Every age it compares (leases, dispatch ages) is measured on the database's clock (``db.clock``), in the
queries themselves: the hosts of workers and beat may disagree about the time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from db import counts, gpu_seconds, retained, transitions
from db.session import session_scope
from db.settings import Settings, get_settings
from worker import dispatcher
from worker.celery_app import dispatch, queue_depths, schedule_reconcile

log = logging.getLogger(__name__)

FOLLOW_UP_DELAY = 0.05  # seconds after the lease's expiry (on the database's clock), so that it has passed


@dataclass
class Report:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    canceled: list[str] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)
    undeliverable: list[str] = field(default_factory=list)
    next_expiry: datetime | None = None  # the earliest lease due before beat's next run, of a job that looks dead
    checked_at: datetime | None = None  # the database's time when next_expiry was read
    checked_monotonic: float = 0.0  # this process's monotonic clock then

    def counts(self) -> dict[str, int]:
        return {name: len(value) for name, value in vars(self).items() if isinstance(value, list)}


def idle_queues() -> list[str]:
    """Queues that hold no message in the broker right now (none if the broker cannot tell)."""
    try:
        return [queue for queue, depth in queue_depths().items() if depth == 0]
    except Exception as exc:
        log.warning("could not read queue depths: %s", exc)
        return []


def reconcile() -> Report:
    settings = get_settings()
    report = Report()

    with session_scope() as session:
        expired = [
            (job.id, job.attempts, job.max_attempts, job.cancel_requested_at)
            for job in transitions.expired_leases(session)
        ]
    for job_id, attempt, max_attempts, cancel_requested_at in expired:
        with session_scope() as session:
            if cancel_requested_at is not None:
                if transitions.cancel(session, job_id, attempt, "canceled: its worker stopped responding"):
                    report.canceled.append(job_id)
            elif attempt >= max_attempts:
                message = (
                    f"The job's worker stopped responding on each of its {attempt} attempts "
                    f"(max_attempts={max_attempts}); it was not retried again."
                )
                if transitions.give_up(session, job_id, attempt, message):
                    report.failed.append(job_id)
            elif transitions.requeue(
                session, job_id, attempt, f"attempt {attempt} lost its worker (lease expired); requeued"
            ):
                report.requeued.append(job_id)
    with session_scope() as session:
        expiry = transitions.next_lease_expiry(session, follow_up_horizon(settings))
    if expiry is not None:
        report.next_expiry, report.checked_at, report.checked_monotonic = expiry.at, expiry.now, time.monotonic()
    idle = idle_queues()
    with session_scope() as session:
        lost = [(job.id, job.queue) for job in transitions.lost_messages(session, settings, idle)]
    for job_id, queue in lost:
        with session_scope() as session:
            if not transitions.claim_resend(session, job_id, settings, idle):
                continue  # another reconciler got there first, or a worker claimed it
        try:
            dispatch(job_id, queue)
        except Exception as exc:  # broker still down: the job waits, a later pass sends it
            log.warning("could not dispatch %s: %s", job_id, exc)
            with session_scope() as session:
                transitions.undo_dispatch(session, job_id)
            report.undeliverable.append(job_id)
            continue
        with session_scope() as session:
            transitions.dispatched_by_reconciler(session, job_id)
        report.dispatched.append(job_id)
    # The scheduler's safety net: jobs that wait while a slot is free (a pass that failed, a requeue, a
    # worker that came back, a broker that was down) are sent now.
    report.dispatched += dispatcher.dispatch_all(settings=settings, by="the reconciler")

    with session_scope() as session:  # keep the job counts' deltas a few seconds long (db.counts)
        counts.compact(session)
    with session_scope() as session:  # and the retained bytes' (db.retained)
        retained.compact(session)
    with session_scope() as session:  # and the scheduler's GPU-seconds (db.gpu_seconds), old buckets dropped
        gpu_seconds.compact(session, settings.fair_share_window_seconds)

    if any(report.counts().values()):
        log.info("reconcile: %s", report.counts())
    return report


def follow_up_horizon(settings: Settings) -> float:
    """How soon a lease must expire to get a reconcile of its own: before beat's next run, and sooner than a
    live worker's lease ever gets (it renews every ``control_poll_seconds``), so only a job that missed
    renewals counts. Live jobs never schedule follow-ups, even with a lease shorter than beat's period."""
    return min(settings.reconcile_interval_seconds, settings.lease_seconds - 2 * settings.control_poll_seconds)


def follow_up(report: Report) -> float | None:
    """Schedule a reconcile for the moment ``report.next_expiry`` comes; the delay in seconds (None: none).

    At most one per run, and only for a future expiry, so a lease this run could not settle waits for
    beat instead of looping.
    """
    if report.next_expiry is None or report.checked_at is None:
        return None
    interval = get_settings().reconcile_interval_seconds
    # The wait as the database saw it, less the time spent since (on this host's monotonic clock).
    left = (report.next_expiry - report.checked_at).total_seconds() - (time.monotonic() - report.checked_monotonic)
    delay = max(left + FOLLOW_UP_DELAY, FOLLOW_UP_DELAY)
    try:
        schedule_reconcile(delay, expires=delay + interval)
    except Exception as exc:  # the broker is down: beat's next run still finds the lease
        log.warning("could not schedule a reconcile in %.2f s: %s", delay, exc)
        return None
    return delay
