"""Failure paths of a running job, through real processes: its deadline, a database blip while it renews its
lease, a warm shutdown (SIGTERM), a cancel asked of a job whose worker was SIGKILLed, and the webhook sent
right after commit with beat's fallback sweep slowed to a minute."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from gpujobs.harness.processes import Stack, signal_group
from tests.integration import webhook_fixtures
from tests.integration.client import auth, diagnostic, events, kinds, wait_for
from tests.integration.webhook_fixtures import job_with_webhook

receiver = webhook_fixtures.receiver
webhooks_worker = webhook_fixtures.webhooks_worker


def _set_row(job_id: str, **values: object) -> None:
    from sqlalchemy import update

    from db.models import Job
    from db.session import session_scope

    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))


def test_a_job_past_its_deadline_fails_as_deadline_exceeded(client, keys, no_gpu_worker, start_worker):
    admin = keys.admin.secret
    job = diagnostic(client, admin, steps=40, sleep_seconds=20)  # 0.5 s a step, far past the deadline below
    _set_row(job["id"], deadline_seconds=1.5)  # before any worker claims it (the type's own deadline is 900 s)
    start_worker()

    failed = wait_for(client, admin, job["id"], ("failed", "succeeded", "canceled"), timeout=30)
    assert failed["status"] == "failed" and failed["error"]["code"] == "deadline_exceeded", failed
    assert "1.5 seconds" in failed["error"]["message"]
    assert failed["attempts"] == 1 and failed["output"] is None
    assert 1 <= failed["progress"]["step"] < 10, failed["progress"]
    assert kinds(job["id"]) == ["queued", "claimed", "failed"]
    (event,) = [e for e in events(job["id"]) if e["kind"] == "failed"]
    assert event["data"] == {"code": "deadline_exceeded"}


@contextmanager
def _database_refuses_connections(database_url: str) -> Iterator[None]:
    """The session's PostgreSQL database takes no connection, and loses the ones it had, inside the block
    (only this run's database: the machine's server and its other databases are untouched)."""
    import psycopg

    from gpujobs.harness.databases import postgres_maintenance_conninfo

    name = database_url.rsplit("/", 1)[1]
    conninfo = postgres_maintenance_conninfo()
    assert conninfo is not None
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def test_a_database_blip_while_the_lease_is_renewed_does_not_lose_the_job(
    client, keys, services, no_gpu_worker, start_worker
):
    from db.settings import get_settings

    if not services.database.is_postgres:
        pytest.skip("SQLite is a file in each process: there is no database server to lose")
    admin = keys.admin.secret
    lease = get_settings().lease_seconds
    worker = start_worker()
    job = diagnostic(client, admin, steps=16, sleep_seconds=8)
    wait_for(client, admin, job["id"], "running", until=lambda j: j["progress"]["step"] >= 2)
    blip = lease / 2  # shorter than a lease: the renewals missed meanwhile must cost nothing
    with _database_refuses_connections(services.database.url):
        time.sleep(blip)
    done = wait_for(client, admin, job["id"], ("succeeded", "failed", "canceled"), timeout=30)

    assert "could not renew the lease of " + job["id"] in worker.log(), "the blip never reached a renewal"
    assert (done["status"], done["attempts"]) == ("succeeded", 1), done
    assert "requeued" not in kinds(job["id"])


def test_sigterm_lets_the_running_job_finish_and_nothing_is_requeued(client, keys, no_gpu_worker, start_worker):
    from sqlalchemy import select

    from db.models import WorkerProcess
    from db.session import session_scope

    admin = keys.admin.secret
    worker = start_worker()
    job = diagnostic(client, admin, steps=8, sleep_seconds=4)
    wait_for(client, admin, job["id"], "running", until=lambda j: j["progress"]["step"] >= 1)
    signal_group(worker.proc, signal.SIGTERM)
    worker.proc.wait(30)  # a warm shutdown: it waits for the job (4 s), not longer

    assert worker.proc.returncode == 0, worker.tail()
    assert "Warm shutdown" in worker.log()
    done = wait_for(client, admin, job["id"], timeout=5)
    assert (done["status"], done["attempts"]) == ("succeeded", 1), done
    assert done["progress"]["step"] == 8
    assert "requeued" not in kinds(job["id"])
    with session_scope() as session:  # the worker said goodbye: shown as stopped, not lost
        stopped = session.scalars(
            select(WorkerProcess.stopped_at).where(WorkerProcess.id.like(f"{worker.node}@%"))
        ).all()
    assert stopped and all(at is not None for at in stopped), stopped


def test_a_cancel_asked_of_a_job_whose_worker_was_killed_ends_it_canceled(client, keys, no_gpu_worker, start_worker):
    admin = keys.admin.secret
    worker = start_worker()
    job = diagnostic(client, admin, steps=100, sleep_seconds=50)
    wait_for(client, admin, job["id"], "running", until=lambda j: j["progress"]["step"] >= 1)
    worker.kill()  # SIGKILL: nobody will see the cancel flag
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(admin))
    assert response.status_code == 202 and response.get_json()["status"] == "running", response.get_data()

    canceled = wait_for(client, admin, job["id"], ("canceled", "failed", "succeeded", "queued"), timeout=30)
    assert (canceled["status"], canceled["attempts"]) == ("canceled", 1), canceled
    timeline = events(job["id"])
    assert [e["kind"] for e in timeline] == ["queued", "claimed", "cancel_requested", "canceled"]
    assert timeline[-1]["message"] == "canceled: its worker stopped responding"


def test_the_completed_webhook_goes_right_after_commit_without_the_sweep(
    client, keys, cluster, services, gpu_worker, webhooks_worker, receiver
):
    """Beat's sweep (the fallback for a lost send) runs once a minute here: the completed webhook must still
    arrive within a couple of seconds of the job's end, sent by the post-commit hook."""
    admin = keys.admin.secret
    webhooks_worker()
    with cluster.beat_paused():
        slow_sweep = {**os.environ, "GPUJOBS_WEBHOOK_SWEEP_SECONDS": "60"}
        stack = Stack(slow_sweep, services.root / "logs", label="slow-sweep")
        try:
            stack.start_beat()
            time.sleep(1)  # a sweep that beat runs as it starts is over before the job exists
            job = job_with_webhook(client, admin, receiver.url("/fast"), steps=2, sleep_seconds=1)
            wait_for(client, admin, job["id"], "succeeded", timeout=30)
            seen = time.monotonic()
            [request] = receiver.wait_for("/fast", lambda found: len(found) >= 1, 10)
        finally:
            stack.stop_all()
    assert request.json()["type"] == "job.completed" and request.json()["data"]["id"] == job["id"]
    assert request.at - seen < 2.0, f"the completed webhook came {request.at - seen:.2f} s after the job ended"
