"""The scheduler's pick (worker/dispatcher.py) on the SQLite schema: capacity, fair share, weights, caps, priority.

No broker here: ``_pick`` only chooses (the sends, the lock and the races are tested in
tests/integration/test_scheduling.py with PostgreSQL and real workers).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from db import clock, transitions
from db.models import Job, JobStatus, Tenant, TenantQuota, WorkerProcess
from db.settings import Settings
from worker import dispatcher

# Slots read on every pass: these tests add workers between passes (the cache has its own test).
SETTINGS = Settings(dispatch_buffer=1, dispatch_slots_cache_seconds=0)


@pytest.fixture
def db(sessions):  # type: ignore[no-untyped-def]
    session = sessions()
    yield session
    session.rollback()
    session.close()


def tenant(db: Any, **quota: Any) -> str:
    row = Tenant(name="unit")
    db.add(row)
    db.flush()
    if quota:
        db.add(TenantQuota(tenant_id=row.id, **quota))
    db.commit()
    return row.id


def worker(
    db: Any, slots: int, queues: tuple[str, ...] = ("gpu",), stopped: bool = False, warming: bool = False
) -> None:
    now = clock.db_now(db)
    db.add(
        WorkerProcess(
            id=f"w{slots}-{now.timestamp()}-{stopped}-{warming}",
            hostname="h",
            pid=1,
            queues=list(queues),
            device={},
            models={},
            current_jobs=[],
            slots=slots,
            started_at=now,
            last_seen_at=now,
            stopped_at=now if stopped else None,
            warming=warming,
        )
    )
    db.commit()


_last_created = [datetime.min.replace(tzinfo=UTC)]


def jobs(db: Any, tenant_id: str, count: int, priority: int = 5, queue: str = "gpu") -> list[str]:
    # SQLite's clock has milliseconds: jobs made in one millisecond would tie on created_at and fall back
    # to their random ids, so each gets its own, one millisecond apart, in the order made (across calls too).
    ids = []
    start = max(clock.db_now(db), _last_created[0] + timedelta(milliseconds=1))
    _last_created[0] = start + timedelta(milliseconds=count)
    for index in range(count):
        job = Job(
            tenant_id=tenant_id, type="diagnostic", queue=queue, input={}, max_attempts=3, deadline_seconds=60,
            priority=priority, created_at=start + timedelta(milliseconds=index),
        )  # fmt: skip
        ids.append(transitions.create(db, job).id)
    db.commit()
    return ids


def pick(db: Any, queue: str = "gpu") -> list[str]:
    capacity = dispatcher._capacity_if_waiting(db, queue, SETTINGS)
    return [] if capacity is None else dispatcher._pick(db, queue, SETTINGS, capacity)


def owners(db: Any, picked: list[str]) -> Counter[str]:
    return Counter(db.get(Job, job_id).tenant_id for job_id in picked)


def test_capacity_is_live_slots_plus_the_buffer_less_in_flight(db) -> None:
    a = tenant(db)
    queued = jobs(db, a, 10)
    assert pick(db) == queued[:1], "no worker: the buffer only"
    worker(db, slots=2)
    worker(db, slots=5, stopped=True)
    worker(db, slots=5, queues=("train",))
    assert len(pick(db)) == 3
    transitions.mark_dispatched(db, queued[:2])
    db.commit()
    assert pick(db) == queued[2:3], "two in flight of three"
    assert dispatcher._capacity_if_waiting(db, "train", SETTINGS) is None, "nothing waits on train"


def test_a_worker_warming_its_models_adds_no_slots_until_it_is_warm(db) -> None:
    a = tenant(db)
    queued = jobs(db, a, 10)
    worker(db, slots=4, warming=True)
    assert pick(db) == queued[:1], "warming: the buffer only, as with no worker"
    db.execute(update(WorkerProcess).values(warming=False))
    db.commit()
    assert len(pick(db)) == 5


def test_one_pass_spreads_the_slots_over_tenants(db) -> None:
    busy, quiet = tenant(db), tenant(db)
    jobs(db, busy, 20)
    jobs(db, quiet, 3)
    worker(db, slots=5)
    assert owners(db, pick(db)) == {busy: 3, quiet: 3}


def test_the_tenant_that_used_less_goes_first(db) -> None:
    busy, other = tenant(db), tenant(db)
    done = jobs(db, busy, 4)
    db.execute(update(Job).where(Job.id.in_(done)).values(status=JobStatus.SUCCEEDED.value,
        started_at=clock.now(db, -60), finished_at=clock.now(db, -1)))  # fmt: skip
    jobs(db, busy, 5)
    late = jobs(db, other, 1)
    db.commit()
    assert pick(db) == late, "one slot: the tenant without recent usage"


def test_weights_share_in_proportion(db) -> None:
    heavy, light = tenant(db, weight=3.0), tenant(db)
    jobs(db, light, 20)
    jobs(db, heavy, 20)
    worker(db, slots=7)
    assert owners(db, pick(db)) == {heavy: 6, light: 2}


def test_a_tenant_at_its_running_cap_is_skipped(db) -> None:
    capped, other = tenant(db, max_running_jobs=1), tenant(db)
    jobs(db, capped, 5)
    worker(db, slots=4)
    assert owners(db, pick(db)) == {capped: 1}
    jobs(db, other, 5)
    picked = pick(db)
    assert owners(db, picked) == {capped: 1, other: 4}


def test_priority_then_age_within_a_tenant(db) -> None:
    a = tenant(db)
    low = jobs(db, a, 2, priority=1)
    normal = jobs(db, a, 2)
    urgent = jobs(db, a, 1, priority=9)
    worker(db, slots=4)
    picked = pick(db)  # 5 slots (4 and the buffer)
    # Ties of age (SQLite's clock has milliseconds) go by id: within one priority, compare as sets.
    assert picked[:1] == urgent and set(picked[1:3]) == set(normal) and set(picked[3:]) == set(low)


def test_recent_gpu_seconds_count_only_jobs_that_ran_in_the_window(db) -> None:
    from db import gpu_seconds

    a = tenant(db)
    ran, never_started, long_ago = jobs(db, a, 3)
    db.execute(update(Job).where(Job.id == ran).values(status=JobStatus.SUCCEEDED.value,
        started_at=clock.now(db, -5), finished_at=clock.now(db, -2)))  # fmt: skip
    db.execute(update(Job).where(Job.id == never_started).values(status=JobStatus.CANCELED.value,
        finished_at=clock.now(db, -1)))  # fmt: skip
    db.execute(update(Job).where(Job.id == long_ago).values(status=JobStatus.SUCCEEDED.value,
        started_at=clock.now(db, -4000), finished_at=clock.now(db, -3900)))  # fmt: skip
    db.commit()
    ((seconds, count),) = gpu_seconds.recent(db, "gpu", [a], window_seconds=600).values()
    assert count == 1 and seconds == pytest.approx(3.0, abs=0.01), "a job canceled before its start used no GPU"


def test_live_slots_are_read_again_once_the_cache_has_aged(db, monkeypatch) -> None:
    settings = Settings(dispatch_buffer=1, dispatch_slots_cache_seconds=1.0)
    now = [1000.0]
    monkeypatch.setattr(dispatcher, "monotonic", lambda: now[0])
    monkeypatch.setattr(dispatcher, "_slots", {})
    a = tenant(db)
    jobs(db, a, 10)
    worker(db, slots=2)
    assert dispatcher._capacity_if_waiting(db, "gpu", settings) == 3, "read: two slots and the buffer"
    worker(db, slots=4)
    now[0] += 0.9
    assert dispatcher._capacity_if_waiting(db, "gpu", settings) == 3, "within the second: the figure read"
    now[0] += 0.2
    assert dispatcher._capacity_if_waiting(db, "gpu", settings) == 7, "then read again: the new worker counts"
