"""Leases are decided on the database's clock, whatever the clock of the host that asks.

The worker that claims and renews and the reconciler that checks run on different hosts in a deployment.
Here each of them runs with this process's host clock (``utcnow``, wherever a module imported it) moved far
off, an hour ahead or behind, while the other runs on the true one: no decision may change. On SQLite the
database's clock is SQLite's own (read by the library, not through Python), so the fake host clock cannot
reach it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from db import clock, models, transitions
from db.models import Job, Tenant, WorkerProcess
from db.settings import Settings

LEASE = 30.0
HOUR = 3600.0


@contextmanager
def host_clock(offset_seconds: float) -> Iterator[None]:
    """This process's host clock (``db.models.utcnow`` and every module's copy of it) runs ``offset`` off."""
    original = models.utcnow

    def skewed() -> datetime:
        return original() + timedelta(seconds=offset_seconds)

    patched = [m for m in list(sys.modules.values()) if getattr(m, "utcnow", None) is original]
    for module in patched:
        module.utcnow = skewed  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in patched:
            module.utcnow = original  # type: ignore[attr-defined]


@pytest.fixture
def db(sessions):  # type: ignore[no-untyped-def]
    session = sessions()
    yield session
    session.rollback()
    session.close()


@pytest.fixture
def new_job(db) -> Callable[..., str]:  # type: ignore[no-untyped-def]
    tenant = Tenant(name="clock")
    db.add(tenant)
    db.commit()

    def make(**fields: Any) -> str:
        job = Job(tenant_id=tenant.id, type="diagnostic", queue="gpu", input={}, max_attempts=3, deadline_seconds=60)
        for name, value in fields.items():
            setattr(job, name, value)
        transitions.create(db, job)
        db.commit()
        return job.id

    return make


def lease_left(db, job_id: str) -> float:  # type: ignore[no-untyped-def]
    expires = db.scalar(select(Job.lease_expires_at).where(Job.id == job_id))
    return (expires - clock.db_now(db)).total_seconds()


def test_the_fake_host_clock_is_the_one_the_old_code_read() -> None:
    """The test's premise: ``host_clock`` moves what ``utcnow`` answers, in db.models and its importers."""
    from api import stats

    with host_clock(HOUR):
        assert (models.utcnow() - datetime.now(models.UTC)).total_seconds() == pytest.approx(HOUR, abs=5)
        assert (stats.utcnow() - datetime.now(models.UTC)).total_seconds() == pytest.approx(HOUR, abs=5)


@pytest.mark.parametrize("offset", [-HOUR, HOUR], ids=["worker-behind", "worker-ahead"])
def test_claim_and_renewal_on_a_skewed_worker_give_leases_of_lease_seconds(db, new_job, offset: float) -> None:
    job_id = new_job()
    with host_clock(offset):  # the worker's host
        claim = transitions.claim(db, job_id, "skewed:1:0", LEASE)
        db.commit()
    assert claim is not None
    assert LEASE - 1 < lease_left(db, job_id) <= LEASE
    started = claim.job.started_at
    assert started is not None and abs((started - clock.db_now(db)).total_seconds()) < 5

    # The reconciler, on a true clock, leaves the live lease alone.
    assert transitions.expired_leases(db) == []
    assert not transitions.requeue(db, job_id, 1, "not expired")
    assert not transitions.give_up(db, job_id, 1, "not expired")
    db.commit()

    with host_clock(offset):
        assert transitions.renew_lease(db, job_id, 1, LEASE).owned
        db.commit()
    assert LEASE - 1 < lease_left(db, job_id) <= LEASE
    assert transitions.expired_leases(db) == []


@pytest.mark.parametrize("offset", [-HOUR, HOUR], ids=["reconciler-behind", "reconciler-ahead"])
def test_a_skewed_reconciler_takes_expired_leases_and_only_those(db, new_job, offset: float) -> None:
    live, dead = new_job(), new_job()
    for job_id in (live, dead):
        assert transitions.claim(db, job_id, "w:1:0", LEASE)
    transitions.renew_lease(db, dead, 1, -1.0)  # its worker's last renewal was over a lease ago
    db.commit()

    with host_clock(offset):  # the reconciler's host
        assert [job.id for job in transitions.expired_leases(db)] == [dead]
        assert not transitions.requeue(db, live, 1, "alive")
        assert transitions.requeue(db, dead, 1, "lease expired")
        db.commit()
    assert db.scalar(select(Job.status).where(Job.id == dead)) == "queued"
    assert db.scalar(select(Job.status).where(Job.id == live)) == "running"


@pytest.mark.parametrize("offset", [-HOUR, HOUR], ids=["reconciler-behind", "reconciler-ahead"])
def test_a_skewed_reconciler_measures_the_wait_for_the_next_expiry_on_the_database_clock(
    db, new_job, offset: float
) -> None:
    job_id = new_job()
    assert transitions.claim(db, job_id, "w:1:0", 2.0)
    db.commit()
    with host_clock(offset):
        expiry = transitions.next_lease_expiry(db, within_seconds=5.0)
    assert expiry is not None
    assert 1.0 < (expiry.at - expiry.now).total_seconds() <= 2.0


@pytest.mark.parametrize("offset", [-HOUR, HOUR], ids=["hosts-behind", "hosts-ahead"])
def test_dispatch_ages_are_measured_on_the_database_clock(db, new_job, offset: float) -> None:
    settings = Settings(redispatch_seconds=900, lost_message_seconds=30)
    with host_clock(offset):  # the API's host: a job marked sent by a skewed clock
        sent = new_job(dispatched_at=models.utcnow())
    with host_clock(-offset):  # the reconciler's host, skewed the other way
        assert transitions.lost_messages(db, settings, idle_queues=["gpu"]) == [], "nothing is that old yet"
    db.execute(update(Job).values(dispatched_at=clock.now(db, -31.0)).where(Job.id == sent))
    db.commit()
    with host_clock(-offset):
        assert transitions.lost_messages(db, settings, idle_queues=[]) == []
        assert [job.id for job in transitions.lost_messages(db, settings, idle_queues=["gpu"])] == [sent]


def test_heartbeats_and_the_lost_worker_check_use_the_database_clock(database_url: str) -> None:
    from api import stats
    from db.session import session_scope
    from worker.heartbeat import Heartbeat

    with host_clock(-HOUR):  # a worker's host an hour behind
        Heartbeat("skewed@host:1:0", ["gpu"]).beat()
    with session_scope() as session:
        row = session.get(WorkerProcess, "skewed@host:1:0")
        assert row is not None and abs((row.last_seen_at - clock.db_now(session)).total_seconds()) < 5
    with host_clock(HOUR), session_scope() as session:  # the API's host an hour ahead
        (view,) = stats.workers(session, lost_after=30, seen_since=clock.db_now(session) - timedelta(minutes=1))
    assert view.state == "alive" and view.silent_seconds < 5
