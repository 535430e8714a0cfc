"""``JobContext`` on the migrated SQLite database (``sessions``) with a fake clock: no services, no other threads."""

from __future__ import annotations

import functools
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db import transitions
from db.models import EventKind, Job, JobEvent, Model, Tenant, utcnow
from db.session import session_scope
from db.settings import Settings
from worker import checkpoints
from worker.context import Canceled, DeadlineExceeded, JobContext, LeaseLost


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def running_job(factory: sessionmaker[Session], tenant: str = "ten_a") -> tuple[str, int]:
    with factory() as session:
        if session.get(Tenant, tenant) is None:
            session.add(Tenant(id=tenant, name=tenant))
            session.flush()
        job = transitions.create(
            session,
            Job(tenant_id=tenant, type="diagnostic", queue="gpu", input={}, max_attempts=2, deadline_seconds=60),
        )
        claim = transitions.claim(session, job.id, "worker-1", lease_seconds=30)
        session.commit()
    assert claim is not None
    return job.id, claim.attempt


def expire_lease(session: Session, job_id: str) -> None:
    """Time passes with no renewal: the lease is over (as when a worker dies)."""
    session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def context(database_url: str, job_id: str, attempt: int, clock: Clock, **settings: object) -> JobContext:
    return JobContext(
        job_id=job_id,
        attempt=attempt,
        tenant_id="ten_a",
        worker_id="worker-1",
        deadline_seconds=60,
        settings=Settings(control_poll_seconds=0.01, lease_seconds=30, **settings),
        clock=clock,
        sessions=functools.partial(session_scope, database_url),
    )


def test_the_deadline_follows_the_clock(sessions, database_url):
    clock = Clock()
    job_id, attempt = running_job(sessions)
    ctx = context(database_url, job_id, attempt, clock)
    clock.now += 59.9
    assert not ctx.should_stop()
    ctx.check()
    clock.now += 0.2
    assert ctx.should_stop()
    with pytest.raises(DeadlineExceeded):
        ctx.check()


def test_a_new_progress_message_is_a_timeline_milestone_and_steps_are_not(sessions, database_url):
    job_id, attempt = running_job(sessions)
    ctx = context(database_url, job_id, attempt, Clock())
    ctx.progress(1, 10, "denoising")
    for step in range(2, 8):
        ctx.progress(step, 10, "denoising")
    ctx.progress(8, 10, "decoding")
    with sessions() as session:
        milestones = session.scalars(
            select(JobEvent.message).where(JobEvent.job_id == job_id, JobEvent.kind == EventKind.PROGRESS.value)
        ).all()
    assert milestones == ["denoising", "decoding"]
    assert ctx.snapshot() == {"step": 8, "total": 10, "fraction": 0.8, "message": "decoding"}


def _until(predicate, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "the control thread did not get there in time"
        time.sleep(0.01)


def test_the_control_thread_saves_progress_renews_the_lease_and_sees_a_cancel(sessions, database_url):
    job_id, attempt = running_job(sessions)
    with sessions() as session:
        first_lease = session.get(Job, job_id).lease_expires_at
    ctx = context(database_url, job_id, attempt, Clock())
    ctx.start()
    try:
        ctx.progress(3, 10)

        def saved() -> bool:
            with sessions() as session:
                job = session.get(Job, job_id)
                return job.progress.get("step") == 3 and job.lease_expires_at > first_lease

        _until(saved)
        with sessions() as session:
            transitions.request_cancel(session, job_id)
            session.commit()
        _until(ctx.should_stop)
        with pytest.raises(Canceled):
            ctx.check()
    finally:
        ctx.close()


def test_a_requeued_job_is_lost_to_the_old_attempt(sessions, database_url):
    job_id, attempt = running_job(sessions)
    ctx = context(database_url, job_id, attempt, Clock())
    with sessions() as session:
        expire_lease(session, job_id)
        assert transitions.requeue(session, job_id, attempt, "lease expired")
        session.commit()
    ctx.start()
    try:
        _until(ctx.should_stop)
        with pytest.raises(LeaseLost):
            ctx.check()
    finally:
        ctx.close()


def test_checkpoints_are_recorded_by_the_owner_only_and_found_by_the_next_attempt(sessions, database_url):
    job_id, attempt = running_job(sessions)
    with sessions() as session:
        assert checkpoints.record(session, job_id, attempt, 30, 100, "jobs/x/step-100", {"latents_key": "k"})
        expire_lease(session, job_id)
        assert transitions.requeue(session, job_id, attempt, "lease expired")
        # The old attempt no longer owns the job: it records nothing.
        assert not checkpoints.record(session, job_id, attempt, 30, 200, "jobs/x/step-200", {})
        claim = transitions.claim(session, job_id, "worker-2", lease_seconds=30)
        session.commit()
    assert claim is not None and claim.attempt == attempt + 1
    ctx = context(database_url, job_id, claim.attempt, Clock())
    found = ctx.latest_checkpoint()
    assert found == checkpoints.Checkpoint(
        step=100, key="jobs/x/step-100", attempt=attempt, details={"latents_key": "k"}
    )
    ctx.resumed(found, load_seconds=0.5)
    with sessions() as session:
        resumed = session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == EventKind.RESUMED.value)
        ).one()
    assert resumed.attempt == claim.attempt and resumed.data["from_attempt"] == attempt


def test_tenant_models_are_the_tenants_own(sessions, database_url):
    job_id, attempt = running_job(sessions)
    running_job(sessions, tenant="ten_b")
    with sessions() as session:
        for model_id, tenant in (("mdl_mine", "ten_a"), ("mdl_theirs", "ten_b")):
            session.add(
                Model(
                    id=model_id,
                    tenant_id=tenant,
                    name=model_id,
                    base_model="demo-sd",
                    storage_key=f"models/{model_id}",
                    size=1,
                    sha256="0" * 64,
                    details={},
                )
            )
        session.commit()
    ctx = context(database_url, job_id, attempt, Clock())
    found = ctx.tenant_models(["mdl_mine", "mdl_theirs", "mdl_gone"])
    assert list(found) == ["mdl_mine"]
    assert found["mdl_mine"].base_model == "demo-sd" and found["mdl_mine"].storage_key == "models/mdl_mine"
