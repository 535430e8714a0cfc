"""Graceful drain: the hand-back transition (fenced like every worker transition), the drain's timing
(wait for the running jobs, then hand back what is left; a second signal hurries it), and the job
context's answer to a hand-back (``check()`` raises ``HandBack`` after a cancel or a lost lease).
"""

from __future__ import annotations

import threading
import time

import pytest

from db import transitions
from db.settings import Settings
from tests.unit import test_transitions as tt
from worker.context import Canceled, HandBack, JobContext
from worker.drain import Drain

db = tt.db
tenant_id = tt.tenant_id
new_job = tt.new_job
LEASE = tt.LEASE


# --- the transition -------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", tt.STATES)
def test_hand_back_only_from_running_by_its_own_attempt(db, new_job, state: str) -> None:
    job_id = tt.in_state(db, new_job, state)
    before, events_before = tt.row(db, job_id), tt.events(db, job_id)
    done = transitions.hand_back(db, job_id, 1, "draining", {"step": 3})
    db.commit()
    if state not in ("running", "running_expired"):
        assert not done and tt.row(db, job_id) == before and tt.events(db, job_id) == events_before
        return
    assert done
    job = tt.row(db, job_id)
    assert job["status"] == "queued" and job["worker_id"] is None and job["lease_expires_at"] is None
    assert job["progress"] == {"step": 3} and job["dispatched_at"] is not None
    # Given back on purpose: the attempt does not count against the budget for lost workers.
    assert job["max_attempts"] == before["max_attempts"] + 1 and job["attempts"] == 1
    assert tt.events(db, job_id)[-1] == ("requeued", 1)


def test_a_stale_attempt_cannot_hand_back_a_newer_run(db, new_job) -> None:
    job_id = new_job()
    transitions.claim(db, job_id, "w1", tt.EXPIRED)
    db.commit()
    assert transitions.requeue(db, job_id, 1, "lost")
    assert transitions.claim(db, job_id, "w2", LEASE) is not None
    db.commit()
    assert not transitions.hand_back(db, job_id, 1, "the first worker drains, late")
    db.commit()
    job = tt.row(db, job_id)
    assert job["status"] == "running" and job["attempts"] == 2 and job["worker_id"] == "w2"


def test_a_cancelled_job_is_not_handed_back(db, new_job) -> None:
    job_id = new_job()
    transitions.claim(db, job_id, "w1", LEASE)
    transitions.request_cancel(db, job_id)
    db.commit()
    assert not transitions.hand_back(db, job_id, 1, "draining")
    assert tt.row(db, job_id)["status"] == "running"  # the worker cancels it instead (runner._hand_back)


# --- the drain ------------------------------------------------------------------------------------------


class FakeJob:
    """A running job as the drain sees it: it ends when told to, or when handed back."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.handed_back = threading.Event()

    def hand_back(self) -> None:
        self.handed_back.set()


def test_a_job_that_ends_within_the_window_is_not_handed_back() -> None:
    drain, job = Drain(), FakeJob("job_a")
    drain.started(job)
    assert drain.begin(5.0)
    assert drain.active
    time.sleep(0.2)
    drain.ended(job)
    assert drain.wait(2.0)
    assert not job.handed_back.is_set()


def test_jobs_still_running_at_the_window_end_are_handed_back() -> None:
    drain, jobs = Drain(), [FakeJob("job_a"), FakeJob("job_b")]
    for job in jobs:
        drain.started(job)
    began = time.monotonic()
    drain.begin(0.3)
    assert drain.wait(3.0)
    assert all(job.handed_back.is_set() for job in jobs)
    assert 0.25 <= time.monotonic() - began < 2.0
    late = FakeJob("job_c")  # a job that started after the hand-back is handed back at once
    drain.started(late)
    assert late.handed_back.is_set()


def test_a_second_signal_hands_back_at_once() -> None:
    drain, job = Drain(), FakeJob("job_a")
    drain.started(job)
    marked: list[bool] = []
    assert drain.begin(60.0, lambda: marked.append(True))
    time.sleep(0.2)
    assert not job.handed_back.is_set()
    began = time.monotonic()
    assert not drain.begin(60.0)  # the second SIGTERM
    assert job.handed_back.wait(2.0)
    assert time.monotonic() - began < 1.0
    assert marked == [True]  # on_begin ran once (the heartbeat marks the worker stopped)


def test_hurry_without_a_drain_begins_one_with_no_window() -> None:
    drain, job = Drain(), FakeJob("job_a")
    drain.started(job)
    drain.hurry()  # SIGQUIT first
    assert job.handed_back.wait(2.0)


# --- the job's side -------------------------------------------------------------------------------------


def _context() -> JobContext:
    return JobContext(
        job_id="job_x", attempt=1, tenant_id="ten_x", worker_id="w", deadline_seconds=60, settings=Settings()
    )


def test_check_raises_hand_back_once_asked_and_a_cancel_still_wins() -> None:
    ctx = _context()
    ctx.check()
    assert not ctx.should_stop() and not ctx.handing_back
    ctx.hand_back()
    assert ctx.should_stop() and ctx.handing_back
    with pytest.raises(HandBack):
        ctx.check()
    ctx._cancel_requested = True  # what the control thread sets when the client cancels
    with pytest.raises(Canceled):
        ctx.check()
