"""Broker outages: a job submitted while the broker is down runs once it is back, and a worker that
holds a message when the broker goes away survives it and carries on.

This test runs a deployment of its own (its own database and an embedded Redis it can stop),
through the real commands: `gpujobs api` (gunicorn), `gpujobs worker` and `gpujobs beat`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from gpujobs.harness.databases import provision_database
from gpujobs.harness.processes import ManagedProcess, Stack
from gpujobs.harness.servers import EmbeddedRedis, start_redis
from tests.integration.client import events
from tests.integration.conftest import embedded_only, make_key


@dataclass
class Deployment:
    base_url: str
    admin_key: str
    database_url: str
    redis: EmbeddedRedis
    stack: Stack
    worker: ManagedProcess

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def job(self, job_id: str) -> dict:
        response = requests.get(f"{self.base_url}/v1/jobs/{job_id}", headers=self.headers(), timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(self, job_id: str, status: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while job["status"] != status and time.monotonic() < deadline:
            time.sleep(0.2)
            job = self.job(job_id)
        assert job["status"] == status, f"job {job_id} is {job['status']} after {timeout:g}s: {job}"
        return job


@pytest.fixture
def deployment(services, tmp_path) -> Iterator[Deployment]:
    import migrations

    database = provision_database(tmp_path / "db", postgres=not embedded_only())
    database_url = database.url
    redis = stack = deployment = None
    try:
        migrations.upgrade(database_url)
        redis = start_redis(tmp_path / "redis")
        env = {
            **os.environ,
            "GPUJOBS_DATABASE_URL": database_url,
            "GPUJOBS_BROKER_URL": redis.url,
            "GPUJOBS_VAR_DIR": str(tmp_path / "var"),
        }
        stack = Stack(env, tmp_path / "logs", label="outage")
        worker = stack.start_worker("gpu,maintenance", concurrency=2, wait=False)
        stack.start_beat()
        _, base_url = stack.start_api(workers=1)
        stack.wait_worker_ready(worker)
        admin = make_key("outage admin", "admin", database_url=database_url)
        deployment = Deployment(base_url, admin.secret, database_url, redis, stack, worker)
        yield deployment
    finally:
        if stack is not None:
            stack.stop_all()
        for server in {redis, deployment.redis if deployment else None} - {None}:
            server.stop()  # the one started here, and the one the test started again
        database.drop()


def _row(database_url: str, job_id: str) -> tuple[str, object]:
    from db.models import Job
    from db.session import session_scope

    with session_scope(database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status, job.dispatched_at


def test_a_job_submitted_while_the_broker_is_down_runs_once_it_is_back(deployment, tmp_path):
    submit_url = f"{deployment.base_url}/v1/jobs"
    body = {"type": "diagnostic", "input": {"steps": 2}}

    # While everything is up, a job runs at once: the deployment works.
    warmup = requests.post(submit_url, json=body, headers={**deployment.headers(), "Prefer": "wait=20"}, timeout=30)
    assert warmup.status_code == 202 and warmup.json()["status"] == "succeeded", warmup.text

    port = deployment.redis.port
    deployment.redis.stop()
    started = time.monotonic()
    response = requests.post(submit_url, json=body, headers=deployment.headers(), timeout=30)
    elapsed = time.monotonic() - started
    assert response.status_code == 202, response.text
    assert elapsed < 10, f"the API took {elapsed:.1f}s to answer without a broker"
    job = response.json()
    assert job["status"] == "queued"
    status, dispatched_at = _row(deployment.database_url, job["id"])
    assert (status, dispatched_at) == ("queued", None)  # committed, never sent

    ready = requests.get(f"{deployment.base_url}/readyz", timeout=30)
    assert ready.status_code == 503
    assert ready.headers["Content-Type"].startswith("application/problem+json")
    assert "broker" in ready.json()["detail"]

    time.sleep(2)  # beats pass with the broker down: the reconciler cannot send it either
    assert _row(deployment.database_url, job["id"]) == ("queued", None)

    deployment.redis = start_redis(tmp_path / "redis", port=port)
    done = deployment.wait_for(job["id"], "succeeded", timeout=90)
    assert done["attempts"] == 1
    timeline = events(job["id"], deployment.database_url)
    dispatched = [e for e in timeline if e["kind"] == "dispatched"]
    # Sent by the reconciler (more than once if two reconciles overlapped: a duplicate is harmless).
    assert dispatched and all("reconciler" in e["message"] for e in dispatched), timeline
    assert [e["kind"] for e in timeline if e["kind"] not in ("progress", "dispatched")] == [
        "queued",
        "claimed",
        "stored",
        "succeeded",
    ]
    assert requests.get(f"{deployment.base_url}/readyz", timeout=30).status_code == 200


def test_a_worker_running_a_job_survives_a_broker_restart_and_consumes_again(deployment, tmp_path):
    """The worker holds the running job's message unacknowledged (acks_late) when Redis goes away. Celery
    5.7.0 crashed here ("Unrecoverable error: AttributeError ... 'hostname'": it closes a connection it
    has already collected, and restoring the unacked message then has no client), so a Redis restart
    killed every busy worker; pyproject.toml keeps celery below 5.7 for it."""
    submit_url = f"{deployment.base_url}/v1/jobs"
    running = requests.post(
        submit_url, json={"type": "diagnostic", "input": {"sleep_seconds": 6}}, headers=deployment.headers(), timeout=30
    )
    assert running.status_code == 202, running.text
    deployment.wait_for(running.json()["id"], "running", timeout=30)

    port = deployment.redis.port
    deployment.redis.stop()
    time.sleep(2)
    deployment.redis = start_redis(tmp_path / "redis", port=port)

    done = deployment.wait_for(running.json()["id"], "succeeded", timeout=60)
    assert done["attempts"] == 1
    assert deployment.worker.alive, f"the worker died with the broker:\n{deployment.worker.tail(40)}"
    after = requests.post(
        submit_url,
        json={"type": "diagnostic", "input": {"steps": 2}},
        headers={**deployment.headers(), "Prefer": "wait=30"},
        timeout=60,
    )
    assert after.status_code == 202 and after.json()["status"] == "succeeded", after.text
    assert deployment.worker.alive
