"""Retry (``POST /v1/jobs/{id}/retry``) and the admin bulk cancel (``POST /v1/jobs/cancel``) through the real
API, PostgreSQL, the broker and a real worker.

Each test works in tenants of its own (a new key makes a new tenant), so its jobs never mix with another test's.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.admin_client import logged_in, page
from tests.integration.client import assert_problem, auth, diagnostic, events, get_job, kinds, submit, wait_for
from tests.integration.conftest import make_key


def _retry(client, key: str, job_id: str, headers: dict[str, str] | None = None):
    return client.post(f"/v1/jobs/{job_id}/retry", headers={**auth(key), **(headers or {})})


def _bulk(client, key: str, body):
    return client.post("/v1/jobs/cancel", json=body, headers=auth(key))


def _lose_its_worker(job_id: str) -> None:
    """What the reconciler does to a job whose worker died on its last attempt: claimed, then given up."""
    from db import transitions
    from db.session import session_scope

    with session_scope() as session:
        claim = transitions.claim(session, job_id, "lost@test", lease_seconds=0.01)
        assert claim is not None
        attempt = claim.attempt
    time.sleep(0.05)  # the lease has run out, and nobody renewed it
    with session_scope() as session:
        assert transitions.give_up(session, job_id, attempt, "its worker was lost on every attempt")


def _column(job_id: str, name: str):
    from sqlalchemy import select

    from db.models import Job
    from db.session import session_scope

    with session_scope() as session:
        return session.execute(select(getattr(Job, name)).where(Job.id == job_id)).scalar_one()


# --- retry ---------------------------------------------------------------------------------------------------


def test_a_failed_job_retried_runs_as_a_new_job_linked_both_ways(app, client, keys, no_gpu_worker):
    owner = make_key("retry owner", "admin")
    body = {"type": "diagnostic", "input": {"steps": 2}, "metadata": {"batch": 7}}
    response = submit(client, owner.secret, body)
    assert response.status_code == 202, response.get_data(as_text=True)
    original = response.get_json()
    _lose_its_worker(original["id"])
    failed = wait_for(client, owner.secret, original["id"], "failed")
    assert failed["retried_as"] == [] and failed["retry_of"] is None

    response = _retry(client, owner.secret, original["id"])
    assert response.status_code == 202, response.get_data(as_text=True)
    retry = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{retry['id']}"
    assert retry["id"] != original["id"] and retry["status"] == "queued" and retry["attempts"] == 0
    assert retry["retry_of"] == original["id"] and retry["retried_as"] == []
    assert (retry["type"], retry["input"], retry["metadata"]) == ("diagnostic", original["input"], {"batch": 7})
    assert _column(retry["id"], "tenant_id") == owner.tenant
    assert _column(retry["id"], "priority") == _column(original["id"], "priority")

    # The original keeps its own history and shows the new job.
    after = get_job(client, owner.secret, original["id"])
    assert after["status"] == "failed" and after["error"] == failed["error"]
    assert after["retried_as"] == [retry["id"]]

    # The dashboard's job pages link them both ways too.
    browser = logged_in(app.test_client(), keys.admin.secret)
    assert f'href="/admin/jobs/{retry["id"]}"' in page(browser, f"/admin/jobs/{original['id']}")
    assert f'href="/admin/jobs/{original["id"]}"' in page(browser, f"/admin/jobs/{retry['id']}")

    no_gpu_worker.ensure_gpu_worker()
    done = wait_for(client, owner.secret, retry["id"], "succeeded", timeout=30)
    assert done["retry_of"] == original["id"]
    assert done["output"]["artifact"]["url"]
    timeline = kinds(retry["id"])
    assert timeline[0] == "queued" and "claimed" in timeline and timeline[-1] == "succeeded"

    # With an Idempotency-Key, a repeated retry is the same new job (200), not another one.
    first = _retry(client, owner.secret, original["id"], {"Idempotency-Key": "retry-1"})
    again = _retry(client, owner.secret, original["id"], {"Idempotency-Key": "retry-1"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert get_job(client, owner.secret, original["id"])["retried_as"] == [retry["id"], first.get_json()["id"]]
    # The same key for a submit is another request: a 422, as for two different submits.
    assert_problem(
        submit(client, owner.secret, body, {"Idempotency-Key": "retry-1"}), 422, ["header", "Idempotency-Key"]
    )
    assert_problem(_retry(client, owner.secret, original["id"], {"Idempotency-Key": ""}), 422)
    wait_for(client, owner.secret, first.get_json()["id"], "succeeded", timeout=30)


def test_only_failed_or_canceled_jobs_are_retried(client, keys, gpu_worker):
    owner = make_key("retry statuses", "admin")
    failed = diagnostic(client, owner.secret, headers={"Prefer": "wait=20"}, fail=True)
    assert failed["status"] == "failed"
    again = _retry(client, owner.secret, failed["id"]).get_json()
    # The same input fails the same way: the retry really ran.
    rerun = wait_for(client, owner.secret, again["id"], "failed")
    assert rerun["error"]["code"] == failed["error"]["code"] == "diagnostic_failure"

    running = diagnostic(client, owner.secret, steps=100, sleep_seconds=30)
    wait_for(client, owner.secret, running["id"], "running")
    body = assert_problem(_retry(client, owner.secret, running["id"]), 409)
    assert "running" in body["detail"]
    assert client.post(f"/v1/jobs/{running['id']}/cancel", headers=auth(owner.secret)).status_code == 202
    wait_for(client, owner.secret, running["id"], "canceled", timeout=15)
    canceled_retry = _retry(client, owner.secret, running["id"])
    assert canceled_retry.status_code == 202, canceled_retry.get_data(as_text=True)
    client.post(f"/v1/jobs/{canceled_retry.get_json()['id']}/cancel", headers=auth(owner.secret))

    succeeded = diagnostic(client, owner.secret, headers={"Prefer": "wait=20"})
    assert succeeded["status"] == "succeeded"
    body = assert_problem(_retry(client, owner.secret, succeeded["id"]), 409)
    assert "succeeded" in body["detail"]


def test_another_tenants_job_is_a_404_and_an_admin_retries_it_in_its_tenant(client, keys, no_gpu_worker):
    owner = make_key("retry target", "admin")
    job = diagnostic(client, owner.secret)
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(owner.secret)).status_code == 202
    assert_problem(_retry(client, keys.user_a.secret, job["id"]), 404)
    assert_problem(_retry(client, owner.secret, "job_doesnotexist"), 404)
    assert_problem(_retry(client, owner.secret, "job$x"), 404)
    assert client.post(f"/v1/jobs/{job['id']}/retry").status_code == 401

    response = _retry(client, keys.admin_b.secret, job["id"])  # an admin of another tenant
    assert response.status_code == 202, response.get_data(as_text=True)
    retry = response.get_json()
    assert _column(retry["id"], "tenant_id") == owner.tenant
    assert get_job(client, owner.secret, retry["id"])["retry_of"] == job["id"]
    assert client.post(f"/v1/jobs/{retry['id']}/cancel", headers=auth(owner.secret)).status_code == 202


def test_the_tenants_quota_applies_to_a_retry(client, keys, no_gpu_worker):
    owner = make_key("retry quota", "admin")
    put = client.put(f"/v1/tenants/{owner.tenant}/quotas", json={"max_queued_jobs": 1}, headers=auth(keys.admin.secret))
    assert put.status_code == 200, put.get_data(as_text=True)
    first = diagnostic(client, owner.secret)
    client.post(f"/v1/jobs/{first['id']}/cancel", headers=auth(owner.secret))
    second = diagnostic(client, owner.secret)  # queued: the tenant's one queued job
    body = assert_problem(_retry(client, owner.secret, first["id"]), 429)
    assert body["quota"] == "max_queued_jobs" and "Retry-After" in _retry(client, owner.secret, first["id"]).headers
    assert get_job(client, owner.secret, first["id"])["retried_as"] == []  # nothing half made

    client.post(f"/v1/jobs/{second['id']}/cancel", headers=auth(owner.secret))
    response = _retry(client, owner.secret, first["id"])
    assert response.status_code == 202, response.get_data(as_text=True)
    client.post(f"/v1/jobs/{response.get_json()['id']}/cancel", headers=auth(owner.secret))


# --- bulk cancel ---------------------------------------------------------------------------------------------


def test_bulk_cancel_by_type_and_by_tenant_leaves_other_jobs(client, keys, no_gpu_worker):
    one, two = make_key("drain one", "admin"), make_key("drain two", "admin")
    ones = [diagnostic(client, one.secret)["id"] for _ in range(3)]
    twos = [diagnostic(client, two.secret)["id"] for _ in range(3)]
    other_type = submit(client, one.secret, {"type": "text_to_image", "input": {"prompt": "a lighthouse"}})
    assert other_type.status_code == 202, other_type.get_data(as_text=True)
    other_id = other_type.get_json()["id"]

    response = _bulk(client, keys.admin.secret, {"type": "diagnostic", "tenant": one.tenant})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"canceled": 3, "ids": ones, "more": False}
    assert {get_job(client, one.secret, i)["status"] for i in ones} == {"canceled"}
    assert get_job(client, one.secret, other_id)["status"] == "queued"
    assert {get_job(client, two.secret, i)["status"] for i in twos} == {"queued"}
    assert "bulk cancel" in events(ones[0])[-1]["message"]

    # By tenant, in two goes of at most 2: oldest first, and `more` says some are left.
    first = _bulk(client, keys.admin.secret, {"tenant": two.tenant, "limit": 2}).get_json()
    assert first == {"canceled": 2, "ids": twos[:2], "more": True}
    rest = _bulk(client, keys.admin.secret, {"tenant": two.tenant, "status": "queued"}).get_json()
    assert rest == {"canceled": 1, "ids": twos[2:], "more": False}
    assert _bulk(client, keys.admin.secret, {"tenant": two.tenant}).get_json() == {
        "canceled": 0,
        "ids": [],
        "more": False,
    }
    assert get_job(client, one.secret, other_id)["status"] == "queued"
    assert _bulk(client, keys.admin.secret, {"tenant": one.tenant}).get_json()["ids"] == [other_id]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body"]),
        ({"status": "queued"}, ["body"]),
        ({"all": False}, ["body"]),
        ({"type": "nope"}, ["body", "type"]),
        ({"tenant": "ten_doesnotexist"}, ["body", "tenant"]),
        ({"tenant": 5}, ["body", "tenant"]),
        ({"type": "x" * 65}, ["body", "type"]),
        ({"type": "diagnostic", "status": "running"}, ["body", "status"]),
        ({"type": "diagnostic", "status": "succeeded"}, ["body", "status"]),
        ({"type": "diagnostic", "limit": 0}, ["body", "limit"]),
        ({"type": "diagnostic", "limit": 10001}, ["body", "limit"]),
        ({"type": "diagnostic", "limit": "ten"}, ["body", "limit"]),
        ({"all": "yes"}, ["body", "all"]),
        ({"all": 1}, ["body", "all"]),
        ({"type": "diagnostic", "limit": "10"}, ["body", "limit"]),
        ({"type": "diagnostic", "owner": "me"}, ["body", "owner"]),
        ([], ["body"]),
    ],
)
def test_bad_bulk_cancel_filters_are_a_422_naming_the_field(client, keys, body, loc):
    assert_problem(_bulk(client, keys.admin.secret, body), 422, loc)


def test_bulk_cancel_needs_an_admin_key_and_a_json_body(client, keys):
    user = keys.user_a
    assert_problem(_bulk(client, user.secret, {"tenant": user.tenant}), 403)
    assert client.post("/v1/jobs/cancel", json={"tenant": user.tenant}).status_code == 401
    bad = client.post(
        "/v1/jobs/cancel", data="{", headers={**auth(keys.admin.secret), "Content-Type": "application/json"}
    )
    assert_problem(bad, 400)
    assert_problem(client.post("/v1/jobs/cancel", data="type=x", headers=auth(keys.admin.secret)), 415)
