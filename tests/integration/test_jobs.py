"""The whole loop on real services: submit over the API, a worker process runs it, outputs land in S3."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime

import requests

from tests.integration.client import assert_problem, auth, diagnostic, events, kinds, submit, wait_for


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_diagnostic_job_runs_and_its_artifact_downloads(client, keys, gpu_worker, database_url):
    response = submit(client, keys.admin.secret, {"type": "diagnostic", "input": {"steps": 3, "sleep_seconds": 0.3}})
    assert response.status_code == 202, response.get_data(as_text=True)
    created = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{created['id']}"
    assert created["id"].startswith("job_")
    assert created["status"] == "queued"
    assert created["attempts"] == 0
    assert created["output"] is None and created["error"] is None
    assert created["input"] == {"steps": 3, "sleep_seconds": 0.3, "fail": False}
    base = f"/v1/jobs/{created['id']}"
    assert created["urls"] == {"self": base, "cancel": f"{base}/cancel", "retry": f"{base}/retry"}
    assert created["retry_of"] is None and created["retried_as"] == []

    job = wait_for(client, keys.admin.secret, created["id"], "succeeded", timeout=30)

    assert job["attempts"] == 1
    assert job["error"] is None
    assert job["progress"]["step"] == 3 and job["progress"]["total"] == 3 and job["progress"]["fraction"] == 1.0
    created_at, started_at, finished_at = (_time(job[k]) for k in ("created_at", "started_at", "finished_at"))
    assert created_at <= started_at <= finished_at
    assert job["metrics"]["queue_seconds"] is not None and job["metrics"]["queue_seconds"] >= 0
    assert job["metrics"]["run_seconds"] >= 0.3  # it slept 0.3 s across its steps

    output = job["output"]
    assert output["steps"] == 3
    artifact = output["artifact"]
    assert artifact["name"] == "diagnostic.json"
    assert artifact["content_type"] == "application/json"
    download = requests.get(artifact["url"], timeout=10)
    assert download.status_code == 200, download.text
    assert len(download.content) == artifact["size"]
    assert hashlib.sha256(download.content).hexdigest() == artifact["sha256"]
    report = json.loads(download.content)
    assert report["job_id"] == job["id"] and report["attempt"] == 1

    timeline = events(job["id"])
    lifecycle = [e["kind"] for e in timeline if e["kind"] not in ("progress", "dispatched")]
    assert lifecycle == ["queued", "claimed", "stored", "succeeded"], timeline
    assert [e["at"] for e in timeline] == sorted(e["at"] for e in timeline)
    stored = next(e for e in timeline if e["kind"] == "stored")
    assert stored["data"] == {"names": ["diagnostic.json"]}


def test_artifact_row_matches_the_object_in_s3(client, keys, gpu_worker, services):
    from sqlalchemy import select

    from db.models import Artifact
    from db.session import session_scope

    job = diagnostic(client, keys.admin.secret, steps=1)
    job = wait_for(client, keys.admin.secret, job["id"], "succeeded")
    with session_scope() as session:
        rows = session.scalars(select(Artifact).where(Artifact.job_id == job["id"])).all()
        assert [(r.name, r.storage_key) for r in rows] == [("diagnostic.json", f"jobs/{job['id']}/1/diagnostic.json")]
        row = rows[0]
    obj = services.s3.client().get_object(Bucket=services.env["GPUJOBS_S3_BUCKET"], Key=row.storage_key)
    data = obj["Body"].read()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (row.size, row.sha256)
    assert job["output"]["artifact"]["sha256"] == row.sha256


def test_a_failing_job_fails_with_an_error_a_user_can_read(client, keys, gpu_worker):
    job = diagnostic(client, keys.admin.secret, steps=2, fail=True)
    job = wait_for(client, keys.admin.secret, job["id"], ("succeeded", "failed"))
    assert job["status"] == "failed"
    assert job["output"] is None
    assert set(job["error"]) == {"code", "message"}
    assert job["error"]["code"] and job["error"]["message"]
    assert "Traceback" not in job["error"]["message"]  # the traceback is for operators, not the public answer
    assert job["finished_at"] is not None and job["attempts"] == 1
    assert kinds(job["id"])[-1] == "failed"


def test_prefer_wait_returns_the_finished_job(client, keys, gpu_worker):
    started = time.monotonic()
    response = submit(client, keys.admin.secret, {"type": "diagnostic", "input": {}}, {"Prefer": "wait=20"})
    elapsed = time.monotonic() - started
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert job["status"] == "succeeded", job
    assert job["output"]["artifact"]["url"]
    assert elapsed < 10, f"a zero-sleep job took {elapsed:.1f}s to come back"

    # GET honours it too: a job that is already finished comes back at once.
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job['id']}", headers={**auth(keys.admin.secret), "Prefer": "wait=20"})
    assert response.status_code == 200 and response.get_json()["status"] == "succeeded"
    assert time.monotonic() - started < 2


def test_bad_prefer_header_is_a_422(client, keys):
    response = submit(client, keys.admin.secret, {"type": "diagnostic", "input": {}}, {"Prefer": "wait=soon"})
    assert_problem(response, 422, ["Prefer"])


def test_list_is_newest_first_with_cursors(client, keys, gpu_worker):
    admin = keys.admin.secret
    mine = [
        submit(client, admin, {"type": "diagnostic", "input": {}, "metadata": {"n": n}}).get_json() for n in range(5)
    ]
    assert all(job["status"] == "queued" for job in mine)

    first = client.get("/v1/jobs?limit=2", headers=auth(admin))
    assert first.status_code == 200
    page = first.get_json()
    assert set(page) == {"items", "next_cursor"}
    assert [j["id"] for j in page["items"]] == [mine[4]["id"], mine[3]["id"]]
    assert page["next_cursor"]

    second = client.get(f"/v1/jobs?limit=2&cursor={page['next_cursor']}", headers=auth(admin)).get_json()
    assert [j["id"] for j in second["items"]] == [mine[2]["id"], mine[1]["id"]]

    # Walk to the end: every job once, newest first, and the last page has no cursor.
    seen: list[dict] = []
    cursor = None
    for _ in range(1000):
        url = "/v1/jobs?limit=100" + (f"&cursor={cursor}" if cursor else "")
        body = client.get(url, headers=auth(admin)).get_json()
        seen.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    ids = [j["id"] for j in seen]
    assert len(ids) == len(set(ids))
    stamps = [(_time(j["created_at"]), j["id"]) for j in seen]
    assert stamps == sorted(stamps, reverse=True)
    assert {j["id"] for j in mine} <= set(ids)
    assert cursor is None


def test_list_filters_by_status_and_type(client, keys, gpu_worker):
    admin = keys.admin.secret
    done = diagnostic(client, admin, headers={"Prefer": "wait=20"})
    assert done["status"] == "succeeded"
    failed = diagnostic(client, admin, fail=True, headers={"Prefer": "wait=20"})
    assert failed["status"] == "failed"

    succeeded = client.get("/v1/jobs?status=succeeded&limit=100", headers=auth(admin)).get_json()["items"]
    assert succeeded and all(j["status"] == "succeeded" for j in succeeded)
    assert done["id"] in {j["id"] for j in succeeded} and failed["id"] not in {j["id"] for j in succeeded}

    by_type = client.get("/v1/jobs?type=diagnostic&status=failed", headers=auth(admin)).get_json()["items"]
    assert by_type and all(j["type"] == "diagnostic" and j["status"] == "failed" for j in by_type)


def test_a_tenant_lists_only_its_own_jobs(client, keys, gpu_worker):
    from tests.integration.conftest import make_key

    job = diagnostic(client, keys.admin.secret)
    # Tenants of this test's own: the session's shared user keys have jobs of other modules' tests.
    owner, other = make_key("lists a", "user"), make_key("lists b", "user")
    body = {"type": "text_to_image", "input": {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}}
    own = submit(client, owner.secret, body).get_json()
    listed = {user: client.get("/v1/jobs?limit=100", headers=auth(user.secret)) for user in (owner, other)}
    assert all(response.status_code == 200 for response in listed.values())
    assert [j["id"] for j in listed[owner].get_json()["items"]] == [own["id"]]
    assert listed[other].get_json() == {"items": [], "next_cursor": None}
    admin_b = client.get("/v1/jobs?limit=100", headers=auth(keys.admin_b.secret)).get_json()
    assert job["id"] in {j["id"] for j in admin_b["items"]}  # admin keys see every tenant


def test_get_job_reads_what_the_worker_wrote(client, keys, gpu_worker):
    job = diagnostic(client, keys.admin.secret, steps=5, sleep_seconds=2.5)
    running = wait_for(client, keys.admin.secret, job["id"], "running", until=lambda j: j["progress"]["step"] >= 2)
    assert running["started_at"] is not None and running["finished_at"] is None
    assert running["progress"]["total"] == 5
    assert 0 < running["progress"]["fraction"] < 1
    assert running["metrics"]["run_seconds"] is None
    done = wait_for(client, keys.admin.secret, job["id"], "succeeded")
    assert done["progress"] == {"step": 5, "total": 5, "fraction": 1.0, "message": None}
    assert done["metrics"]["run_seconds"] >= 2.5


# Last in this module: it stops the default worker, which the tests above share.
def test_prefer_wait_gives_up_and_answers_with_the_job_as_it_is(client, keys, no_gpu_worker):
    started = time.monotonic()
    response = submit(client, keys.admin.secret, {"type": "diagnostic", "input": {}}, {"Prefer": "wait=1"})
    elapsed = time.monotonic() - started
    assert response.status_code == 202
    assert response.get_json()["status"] == "queued"
    assert 0.9 <= elapsed < 5
