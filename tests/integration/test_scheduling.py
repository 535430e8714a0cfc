"""The scheduler (worker/dispatcher.py) with real workers, PostgreSQL and the broker: admission in the
database, fair share between tenants, weights, priorities, per-tenant running caps, two dispatchers
racing, and the events that dispatch at once (a submit, a worker's start).

Timing bounds are generous (a 0.5 s job, bounds of many jobs); ``bench/fair_share.py`` measures.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select, update

from tests.integration.client import PROBLEM_JSON, auth, diagnostic, get_job, submit, wait_for
from tests.integration.conftest import make_key, purge_queue, quiesce

JOB_SECONDS = 0.5


@pytest.fixture
def quiet_gpu(no_gpu_worker: Any) -> Iterator[None]:
    """No worker serves gpu, and no row of a killed worker still counts as capacity; afterwards nothing runs."""
    forget_workers()
    yield
    quiesce()
    purge_queue("gpu")
    forget_workers()


def forget_workers() -> None:
    """Mark every worker row stopped: a live worker says it is alive again at its next heartbeat."""
    from db.clock import now
    from db.models import WorkerProcess
    from db.session import session_scope

    with session_scope() as session:
        session.execute(update(WorkerProcess).where(WorkerProcess.stopped_at.is_(None)).values(stopped_at=now(session)))


def row(job_id: str) -> Any:
    from db.models import Job
    from db.session import session_scope

    with session_scope() as session:
        return session.execute(
            select(Job.status, Job.dispatched_at, Job.created_at, Job.started_at).where(Job.id == job_id)
        ).one()


def count(tenant: str, status: str) -> int:
    from db.models import Job
    from db.session import session_scope

    with session_scope() as session:
        query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant, Job.status == status)
        return int(session.execute(query).scalar_one())


def backlog(client: Any, key: str, jobs: int, **extra: Any) -> list[str]:
    return [diagnostic(client, key, sleep_seconds=JOB_SECONDS, **extra)["id"] for _ in range(jobs)]


def wait_running(tenant: str, jobs: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while count(tenant, "running") < jobs:
        assert time.monotonic() < deadline, f"{jobs} jobs of {tenant} not running after {timeout:g} s"
        time.sleep(0.05)


def start_delay(client: Any, key: str, job_id: str, timeout: float = 60.0) -> float:
    job = wait_for(client, key, job_id, statuses=("running", "succeeded"), timeout=timeout)
    started = row(job["id"])
    return float((started.started_at - started.created_at).total_seconds())


def set_quota(tenant: str, **values: Any) -> None:
    from db.models import TenantQuota
    from db.session import session_scope

    with session_scope() as session:
        session.merge(TenantQuota(tenant_id=tenant, **values))


def test_a_tenant_with_a_backlog_does_not_hold_up_another(client, quiet_gpu, start_worker) -> None:
    a, b = make_key("fair a", "admin"), make_key("fair b", "admin")
    jobs = backlog(client, a.secret, 200)
    assert row(jobs[-1]).dispatched_at is None, "the backlog waits in the database, not in the broker"
    start_worker("gpu", concurrency=2)
    wait_running(a.tenant, 2)
    job = diagnostic(client, b.secret, sleep_seconds=JOB_SECONDS)
    delay = start_delay(client, b.secret, job["id"])
    # FIFO would start it after all of A's jobs (200 × 0.5 s / 2 slots = 50 s).
    assert delay < 10 * JOB_SECONDS, f"B's job waited {delay:.2f} s"
    assert count(a.tenant, "queued") > 150, "A still holds its backlog"


def test_priority_orders_a_tenants_own_jobs(client, quiet_gpu, start_worker) -> None:
    a = make_key("priority a", "admin")
    backlog(client, a.secret, 200)
    start_worker("gpu", concurrency=2)
    wait_running(a.tenant, 2)
    response = submit(client, a.secret, {"type": "diagnostic", "input": {"sleep_seconds": JOB_SECONDS}, "priority": 9})
    assert response.status_code == 202, response.get_data(as_text=True)
    urgent = response.get_json()
    assert urgent["priority"] == 9
    delay = start_delay(client, a.secret, urgent["id"])
    assert delay < 10 * JOB_SECONDS, f"the priority-9 job waited {delay:.2f} s"
    assert count(a.tenant, "queued") > 150


def test_weights_share_the_slots(client, quiet_gpu, start_worker) -> None:
    heavy, light = make_key("weight 3", "admin"), make_key("weight 1", "admin")
    set_quota(heavy.tenant, weight=3.0)
    for _ in range(40):  # interleaved, so that submission order favours neither
        diagnostic(client, heavy.secret, sleep_seconds=0.2)
        diagnostic(client, light.secret, sleep_seconds=0.2)
    start_worker("gpu", concurrency=2)
    deadline = time.monotonic() + 60
    while count(heavy.tenant, "succeeded") + count(light.tenant, "succeeded") < 24:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    done_heavy, done_light = count(heavy.tenant, "succeeded"), count(light.tenant, "succeeded")
    # Weight 3 against 1: about three jobs to one while both wait (at least twice as many, generously).
    assert done_heavy >= 2 * done_light and done_light >= 1, (done_heavy, done_light)


def test_max_running_jobs_caps_a_tenant_per_queue(client, quiet_gpu, start_worker) -> None:
    from db.models import Job
    from db.session import session_scope

    capped = make_key("capped", "admin")
    set_quota(capped.tenant, max_running_jobs=1)
    jobs = backlog(client, capped.secret, 6, steps=2)
    start_worker("gpu", concurrency=3)
    for job_id in jobs:
        wait_for(client, capped.secret, job_id, timeout=60)
    with session_scope() as session:
        spans = session.execute(select(Job.started_at, Job.finished_at).where(Job.id.in_(jobs))).all()
    spans.sort()
    overlaps = [(a, b) for a, b in itertools.pairwise(spans) if b.started_at < a.finished_at]
    assert not overlaps, f"two jobs of a tenant capped at 1 ran at once: {overlaps}"


def test_an_idle_system_dispatches_at_submit(client, keys, gpu_worker) -> None:
    job = diagnostic(client, keys.admin.secret)
    assert row(job["id"]).dispatched_at is not None, "sent by the submit itself, not by a later reconcile"
    assert wait_for(client, keys.admin.secret, job["id"])["status"] == "succeeded"


def test_a_worker_started_after_the_submit_picks_the_jobs_up(client, quiet_gpu, start_worker) -> None:
    a = make_key("late worker", "admin")
    jobs = [diagnostic(client, a.secret)["id"] for _ in range(4)]
    assert sum(row(job_id).dispatched_at is None for job_id in jobs) >= 2, "no slot: they wait in the database"
    started = time.monotonic()
    start_worker("gpu", concurrency=2)
    for job_id in jobs:
        assert wait_for(client, a.secret, job_id, timeout=30)["status"] == "succeeded"
    assert time.monotonic() - started < 30


def test_two_dispatchers_racing_never_send_a_job_twice_nor_overfill(services) -> None:
    """Two threads run passes on one queue while a third ends jobs; a monitor checks in-flight ≤ capacity."""
    from db import transitions
    from db.clock import now
    from db.models import Job, JobStatus, WorkerProcess
    from db.session import session_scope
    from db.settings import get_settings
    from worker.dispatcher import dispatch_pass

    queue = f"race-{uuid.uuid4().hex[:8]}"
    settings = get_settings()
    tenants = [make_key(f"race {n}", "admin").tenant for n in range(3)]
    with session_scope() as session:
        session.add(
            WorkerProcess(
                id=f"race-worker-{queue}",
                hostname="race",
                pid=0,
                queues=[queue],
                device={},
                models={},
                current_jobs=[],
                slots=3,
                started_at=transitions.clock.db_now(session),
                last_seen_at=transitions.clock.db_now(session),
            )
        )
        for n in range(90):
            job = Job(
                tenant_id=tenants[n % 3], type="diagnostic", queue=queue, input={}, max_attempts=1, deadline_seconds=60
            )
            transitions.create(session, job)
    capacity = 3 + settings.dispatch_buffer
    in_flight = (Job.queue == queue) & (Job.status == JobStatus.QUEUED.value) & Job.dispatched_at.is_not(None)
    sent: list[list[str]] = [[], []]
    stop = threading.Event()
    peaks: list[int] = []

    def dispatcher(n: int) -> None:
        while not stop.is_set():
            sent[n] += dispatch_pass(queue)

    def finisher() -> None:  # ends sent jobs (a cancel of a queued job frees its slot), as workers would
        while not stop.is_set():
            with session_scope() as session:
                ids = session.scalars(select(Job.id).where(in_flight).limit(2)).all()
                for job_id in ids:
                    transitions.request_cancel(session, job_id)
            time.sleep(0.01)

    def monitor() -> None:
        while not stop.is_set():
            with session_scope() as session:
                peaks.append(session.execute(select(func.count()).select_from(Job).where(in_flight)).scalar_one())

    threads = [threading.Thread(target=f, args=a) for f, a in ((dispatcher, (0,)), (dispatcher, (1,)))]
    threads += [threading.Thread(target=finisher), threading.Thread(target=monitor)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    try:
        while len(sent[0]) + len(sent[1]) < 90 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        race_worker = WorkerProcess.id == f"race-worker-{queue}"
        with session_scope() as session:
            session.execute(update(WorkerProcess).where(race_worker).values(stopped_at=now(session)))
        purge_queue(queue)
    everything = sent[0] + sent[1]
    assert len(everything) == 90 and len(set(everything)) == 90, "each job sent exactly once"
    assert sent[0] and sent[1], "both dispatchers sent jobs"
    assert max(peaks) <= capacity, f"in flight peaked at {max(peaks)} > capacity {capacity}"


def test_a_pass_commits_without_waiting_for_the_disk_and_only_its_own_transaction(services) -> None:
    """The lock turns ``synchronous_commit`` off for the pass's transaction (worker/dispatcher.py ``_lock``);
    the connection's next transaction, whoever uses it, waits for its commit again."""
    from sqlalchemy import text

    from db.session import session_scope
    from worker import dispatcher

    with session_scope() as session:
        if session.get_bind().dialect.name != "postgresql":
            pytest.skip("SQLite has no advisory lock nor synchronous_commit (CI runs this on PostgreSQL)")
        raw = session.connection().connection.dbapi_connection
        assert session.execute(text("SHOW synchronous_commit")).scalar_one() == "on"
        dispatcher._lock(session, f"sync-{uuid.uuid4().hex[:8]}")
        assert session.execute(text("SHOW synchronous_commit")).scalar_one() == "off"
        session.commit()
        # The next transaction, on the same connection (the pool hands back the one returned last).
        assert session.connection().connection.dbapi_connection is raw
        assert session.execute(text("SHOW synchronous_commit")).scalar_one() == "on"


@pytest.mark.parametrize("value", [-1, 10, "5", 5.5, True, None, 10**30])
def test_a_bad_priority_is_a_422_naming_it(client, keys, value: Any) -> None:
    response = submit(client, keys.admin.secret, {"type": "diagnostic", "input": {}, "priority": value})
    assert response.status_code == 422 and response.mimetype == PROBLEM_JSON, response.get_data(as_text=True)
    assert ["body", "priority"] in [error["loc"] for error in response.get_json()["errors"]]


def test_priority_defaults_to_5_and_is_shown(client, keys) -> None:
    job = diagnostic(client, keys.admin.secret)
    assert job["priority"] == 5
    assert get_job(client, keys.admin.secret, job["id"])["priority"] == 5
    schemas = client.get("/openapi.json", headers=auth(keys.admin.secret)).get_json()["components"]["schemas"]
    # Every job type's Job shares the common fields (JobCommon), priority among them.
    assert schemas["JobCommon"]["properties"]["priority"] == {"type": "integer", "minimum": 0, "maximum": 9}
    assert {"$ref": "#/components/schemas/JobCommon"} in schemas["diagnosticJob"]["allOf"]
