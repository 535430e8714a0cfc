"""Cancel: a queued job never runs, a running one stops at its next step, a finished one is a 409."""

from __future__ import annotations

import time

from tests.integration.client import assert_problem, auth, diagnostic, kinds, wait_for


def _cancel(client, key, job_id):
    return client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))


def _artifacts(job_id: str, services) -> tuple[list[str], list[str]]:
    """Artifact rows in the database and objects under the job's prefix in S3."""
    from sqlalchemy import select

    from db.models import Artifact
    from db.session import session_scope

    with session_scope() as session:
        rows = session.scalars(select(Artifact.name).where(Artifact.job_id == job_id)).all()
    listing = services.s3.client().list_objects_v2(Bucket=services.env["GPUJOBS_S3_BUCKET"], Prefix=f"jobs/{job_id}/")
    return list(rows), [obj["Key"] for obj in listing.get("Contents", [])]


def test_cancel_of_a_queued_job_is_immediate_and_it_never_runs(client, keys, no_gpu_worker, services):
    admin = keys.admin.secret
    # No worker serves the gpu queue: the job's message waits in the broker.
    job = diagnostic(client, admin, steps=1)
    response = _cancel(client, admin, job["id"])
    assert response.status_code == 202, response.get_data(as_text=True)
    canceled = response.get_json()
    assert canceled["status"] == "canceled"
    assert canceled["finished_at"] is not None and canceled["started_at"] is None

    # Now a worker takes the message: it must find nothing to run.
    worker = no_gpu_worker.ensure_gpu_worker()
    deadline = time.monotonic() + 20
    while "'not_claimed'" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "'not_claimed'" in worker.log(), "the worker never received the canceled job's message"

    after = wait_for(client, admin, job["id"], "canceled")
    assert after["attempts"] == 0 and after["started_at"] is None and after["output"] is None
    assert "claimed" not in kinds(job["id"])
    assert _artifacts(job["id"], services) == ([], [])


def test_cancel_of_a_running_job_stops_it_at_its_next_step(client, keys, gpu_worker, services):
    admin = keys.admin.secret
    job = diagnostic(client, admin, steps=200, sleep_seconds=40)  # 0.2 s a step
    running = wait_for(client, admin, job["id"], "running", until=lambda j: j["progress"]["step"] >= 2)
    asked_at = time.monotonic()
    response = _cancel(client, admin, job["id"])
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json()["status"] in ("running", "canceled")

    canceled = wait_for(client, admin, job["id"], ("canceled", "succeeded", "failed"), timeout=15)
    stopped_after = time.monotonic() - asked_at
    assert canceled["status"] == "canceled", canceled
    assert stopped_after < 5, f"the job took {stopped_after:.1f}s to stop"
    assert running["progress"]["step"] <= canceled["progress"]["step"] < 50
    assert canceled["output"] is None and canceled["error"] is None
    assert canceled["finished_at"] is not None
    timeline = kinds(job["id"])
    assert "cancel_requested" in timeline and timeline[-1] == "canceled"
    assert "succeeded" not in timeline and "stored" not in timeline
    assert _artifacts(job["id"], services) == ([], [])

    # A second cancel of the now finished job is a conflict.
    assert_problem(_cancel(client, admin, job["id"]), 409)


def test_cancel_of_a_finished_job_is_a_409(client, keys, gpu_worker):
    admin = keys.admin.secret
    job = diagnostic(client, admin, headers={"Prefer": "wait=20"})
    assert job["status"] == "succeeded"
    body = assert_problem(_cancel(client, admin, job["id"]), 409)
    assert "succeeded" in body["detail"]
    assert wait_for(client, admin, job["id"], "succeeded")["output"] is not None


def test_cancel_of_an_unknown_job_is_a_404(client, keys):
    assert_problem(_cancel(client, keys.admin.secret, "job_doesnotexist"), 404)
