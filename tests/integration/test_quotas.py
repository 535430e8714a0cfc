"""Per-tenant quotas through the real API (PostgreSQL, Redis, workers): reading and setting them (admin), each
quota refusing a submit with a 429 and its headers and letting submits through again, and the dashboard's form.

Each test works in tenants of its own (a new key makes a new tenant), so counts never mix with another test's.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.admin_client import HTML, logged_in, page, post_form
from tests.integration.client import assert_problem, auth, diagnostic, submit, wait_for
from tests.integration.conftest import make_key

DEFAULTS = {
    "weight": 1.0,
    "max_queued_jobs": 10_000,
    "max_running_jobs": 0,
    "submits_per_minute": 0,
    "max_retained_bytes": 0,
    "artifact_ttl_seconds": 0,
}


def _tenant(client, admin: str, tenant_id: str) -> dict:
    response = client.get(f"/v1/tenants/{tenant_id}", headers=auth(admin))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def _put(client, admin: str, tenant_id: str, body) -> dict:
    response = client.put(f"/v1/tenants/{tenant_id}/quotas", json=body, headers=auth(admin))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def _refused(response, quota: str, limit: int) -> dict:
    """A 429 naming ``quota``, with Retry-After and the RateLimit-* header fields."""
    body = assert_problem(response, 429)
    assert body["quota"] == quota and body["limit"] == limit, body
    assert quota in body["detail"], body
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60, response.headers
    assert response.headers["RateLimit-Limit"] == str(limit)
    assert response.headers["RateLimit-Remaining"] == "0"
    assert response.headers["RateLimit-Reset"] == str(retry_after)
    assert response.headers["RateLimit-Policy"].startswith(str(limit))
    assert f'comment="{quota}"' in response.headers["RateLimit-Policy"]
    return body


def _diagnostic_body(**params) -> dict:
    return {"type": "diagnostic", "input": params}


# --- reading and setting ----------------------------------------------------------------------------------------


def test_overrides_beat_the_defaults_and_clearing_restores_them(client, keys):
    admin = keys.admin.secret
    user = make_key("quota reader", "user")
    fresh = _tenant(client, admin, user.tenant)
    assert fresh["id"] == user.tenant and fresh["name"] and fresh["created_at"]
    assert fresh["quotas"] == DEFAULTS and fresh["overrides"] == {}
    assert fresh["usage"] == {"queued_jobs": 0, "running_jobs": {}, "submits_last_minute": None, "retained_bytes": 0}

    changed = _put(client, admin, user.tenant, {"max_queued_jobs": 3, "weight": 2, "artifact_ttl_seconds": 0})
    assert changed["overrides"] == {"weight": 2.0, "max_queued_jobs": 3, "artifact_ttl_seconds": 0}
    assert changed["quotas"] == {**DEFAULTS, "weight": 2.0, "max_queued_jobs": 3}
    assert _tenant(client, admin, user.tenant) == changed

    # A subset changes only what it names; null clears one override, back to the default.
    cleared = _put(client, admin, user.tenant, {"max_queued_jobs": None, "submits_per_minute": 100})
    assert cleared["overrides"] == {"weight": 2.0, "submits_per_minute": 100, "artifact_ttl_seconds": 0}
    assert cleared["quotas"]["max_queued_jobs"] == DEFAULTS["max_queued_jobs"]
    assert cleared["usage"]["submits_last_minute"] == 0  # counted now that the tenant has that quota
    assert _put(client, admin, user.tenant, {})["overrides"] == cleared["overrides"]
    back = _put(client, admin, user.tenant, dict.fromkeys(["weight", "submits_per_minute", "artifact_ttl_seconds"]))
    assert back["overrides"] == {} and back["quotas"] == DEFAULTS

    # The admin list pages through every tenant like the other lists.
    seen, cursor = [], None
    while True:
        response = client.get("/v1/tenants", query_string={"limit": 2, "cursor": cursor or ""}, headers=auth(admin))
        assert response.status_code == 200, response.get_data(as_text=True)
        listed = response.get_json()
        assert len(listed["items"]) <= 2
        seen += [t["id"] for t in listed["items"]]
        cursor = listed["next_cursor"]
        if not cursor:
            break
    assert user.tenant in seen and keys.user_a.tenant in seen and len(seen) == len(set(seen))


def test_a_user_key_reads_its_own_tenant_only_and_sets_nothing(client, keys):
    user, other = keys.user_a, keys.user_b
    own = client.get(f"/v1/tenants/{user.tenant}", headers=auth(user.secret))
    assert own.status_code == 200 and own.get_json()["id"] == user.tenant
    assert_problem(client.get(f"/v1/tenants/{other.tenant}", headers=auth(user.secret)), 404)
    assert_problem(client.get("/v1/tenants", headers=auth(user.secret)), 403)
    for tenant in (user.tenant, other.tenant):
        put = client.put(f"/v1/tenants/{tenant}/quotas", json={"max_queued_jobs": 10**6}, headers=auth(user.secret))
        assert_problem(put, 403)
    assert _tenant(client, keys.admin.secret, user.tenant)["overrides"] == {}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"max_queued_jobs": -1}, "max_queued_jobs", "greater than or equal to 0"),
        ({"max_queued_jobs": 1e30}, "max_queued_jobs", "valid integer"),
        ({"max_queued_jobs": 10**30}, "max_queued_jobs", "less than or equal to"),
        ({"max_running_jobs": 2.5}, "max_running_jobs", "valid integer"),
        ({"submits_per_minute": 5.0}, "submits_per_minute", "valid integer"),
        ({"submits_per_minute": "5"}, "submits_per_minute", "valid integer"),
        ({"max_retained_bytes": True}, "max_retained_bytes", "valid integer"),
        ({"max_retained_bytes": 10**16}, "max_retained_bytes", "less than or equal to"),
        ({"artifact_ttl_seconds": [60]}, "artifact_ttl_seconds", "valid integer"),
        ({"weight": 0}, "weight", "greater than 0"),
        ({"weight": 1e9}, "weight", "less than or equal to 1000"),
        ({"weight": "heavy"}, "weight", "valid number"),
        ({"max_jobs": 5}, "max_jobs", "Extra inputs are not permitted"),
    ],
)
def test_bad_quotas_are_a_422_naming_the_field(client, keys, body, field, words):
    tenant = keys.user_b.tenant
    response = client.put(f"/v1/tenants/{tenant}/quotas", json=body, headers=auth(keys.admin.secret))
    problem = assert_problem(response, 422, loc=["body", field])
    assert words in problem["detail"], problem
    assert _tenant(client, keys.admin.secret, tenant)["overrides"] == {}


def test_unknown_tenants_and_bodies_that_are_not_objects(client, keys):
    admin = auth(keys.admin.secret)
    assert_problem(client.get("/v1/tenants/ten_doesnotexist", headers=admin), 404)
    assert_problem(client.put("/v1/tenants/ten_doesnotexist/quotas", json={"weight": 2}, headers=admin), 404)
    assert_problem(client.get("/v1/tenants/not%20an%20id", headers=admin), 404)
    target = f"/v1/tenants/{keys.user_b.tenant}/quotas"
    assert_problem(client.put(target, json=[1, 2], headers=admin), 422, loc=["body"])
    assert_problem(client.put(target, data="max_queued_jobs=3", headers=admin), 415)
    assert_problem(client.put(target, data="{not json", headers={**admin, "Content-Type": "application/json"}), 400)
    assert_problem(client.get("/v1/tenants?limit=0", headers=admin), 422, loc=["query", "limit"])
    assert_problem(client.get("/v1/tenants?cursor=nonsense", headers=admin), 422, loc=["query", "cursor"])


# --- enforcement at submit ---------------------------------------------------------------------------------------


def test_max_queued_jobs_refuses_then_lets_through_when_a_job_leaves_the_queue(client, keys, no_gpu_worker):
    admin, tenant = keys.admin.secret, make_key("queue filler", "admin")
    _put(client, admin, tenant.tenant, {"max_queued_jobs": 2})
    first = diagnostic(client, tenant.secret, headers={"Idempotency-Key": "first"})
    diagnostic(client, tenant.secret)  # nothing serves the gpu queue: both stay queued
    body = _refused(submit(client, tenant.secret, _diagnostic_body()), "max_queued_jobs", 2)
    assert body["used"] == 2
    assert _tenant(client, admin, tenant.tenant)["usage"]["queued_jobs"] == 2
    # Repeating an existing job is not a new job: no quota refuses it.
    again = submit(client, tenant.secret, _diagnostic_body(), headers={"Idempotency-Key": "first"})
    assert again.status_code == 200 and again.get_json()["id"] == first["id"]
    # Another tenant is not concerned.
    assert submit(client, keys.admin_b.secret, _diagnostic_body()).status_code == 202

    assert client.post(f"/v1/jobs/{first['id']}/cancel", headers=auth(tenant.secret)).status_code == 202
    diagnostic(client, tenant.secret)
    _refused(submit(client, tenant.secret, _diagnostic_body()), "max_queued_jobs", 2)
    # Raising the override lets the next one through; clearing it restores the default (10,000).
    _put(client, admin, tenant.tenant, {"max_queued_jobs": 3})
    assert submit(client, tenant.secret, _diagnostic_body()).status_code == 202
    _refused(submit(client, tenant.secret, _diagnostic_body()), "max_queued_jobs", 3)
    _put(client, admin, tenant.tenant, {"max_queued_jobs": None})
    assert submit(client, tenant.secret, _diagnostic_body()).status_code == 202


def test_submits_per_minute_refuses_until_the_window_passes(client, keys, monkeypatch):
    from api import quotas

    admin, tenant = keys.admin.secret, make_key("fast submitter", "admin")
    second_key = make_key("its second key", "admin", tenant=tenant.tenant)
    start = (quotas.clock() // 60 + 1) * 60 + 0.5  # a window of our own, half a second in
    monkeypatch.setattr(quotas, "clock", lambda: start)
    _put(client, admin, tenant.tenant, {"submits_per_minute": 3})
    for key in (tenant, second_key, tenant):  # all the tenant's keys count together
        assert submit(client, key.secret, _diagnostic_body()).status_code == 202
    refused = submit(client, second_key.secret, _diagnostic_body())
    body = _refused(refused, "submits_per_minute", 3)
    assert refused.headers["Retry-After"] == "59"
    assert refused.headers["RateLimit-Policy"] == '3;w=60;comment="submits_per_minute"'
    assert body["used"] == 4
    assert _tenant(client, admin, tenant.tenant)["usage"]["submits_last_minute"] == 4
    # Reads are not submits; other tenants are not concerned.
    assert client.get("/v1/jobs", headers=auth(tenant.secret)).status_code == 200
    assert submit(client, keys.admin_b.secret, _diagnostic_body()).status_code == 202

    monkeypatch.setattr(quotas, "clock", lambda: start + 60)  # the next window
    assert submit(client, tenant.secret, _diagnostic_body()).status_code == 202
    assert _tenant(client, admin, tenant.tenant)["usage"]["submits_last_minute"] == 1
    _put(client, admin, tenant.tenant, {"submits_per_minute": 0})  # 0: no limit
    assert all(submit(client, tenant.secret, _diagnostic_body()).status_code == 202 for _ in range(4))


def test_submits_per_minute_lets_submits_through_when_redis_is_unavailable(keys):
    import api
    from db.settings import Settings
    from gpujobs.harness.ports import free_port

    client = api.create_app(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    tenant = make_key("submitter without redis", "admin")
    _put(client, keys.admin.secret, tenant.tenant, {"submits_per_minute": 1})
    statuses = [submit(client, tenant.secret, _diagnostic_body()).status_code for _ in range(3)]
    assert statuses == [202] * 3
    assert _tenant(client, keys.admin.secret, tenant.tenant)["usage"]["submits_last_minute"] is None


def test_max_retained_bytes_refuses_until_outputs_expire(client, keys, gpu_worker):
    from sqlalchemy import update

    from db.models import Artifact, utcnow
    from db.session import session_scope

    admin, tenant = keys.admin.secret, make_key("hoarder", "admin")
    done = wait_for(client, tenant.secret, diagnostic(client, tenant.secret)["id"], "succeeded")
    stored = done["output"]["artifact"]["size"]
    assert stored > 0 and _tenant(client, admin, tenant.tenant)["usage"]["retained_bytes"] == stored

    _put(client, admin, tenant.tenant, {"max_retained_bytes": stored + 1})
    assert submit(client, tenant.secret, _diagnostic_body(fail=True)).status_code == 202  # under: accepted
    _put(client, admin, tenant.tenant, {"max_retained_bytes": stored})
    body = _refused(submit(client, tenant.secret, _diagnostic_body()), "max_retained_bytes", stored)
    assert body["used"] == stored

    # Retention expires the outputs (it sets expired_at once the object is deleted): they count no more.
    with session_scope() as session:
        session.execute(update(Artifact).where(Artifact.job_id == done["id"]).values(expired_at=utcnow()))
    assert _tenant(client, admin, tenant.tenant)["usage"]["retained_bytes"] == 0
    assert submit(client, tenant.secret, _diagnostic_body()).status_code == 202


# --- the dashboard -----------------------------------------------------------------------------------------------


def test_the_dashboard_shows_quotas_and_usage_and_sets_and_clears_overrides(app, client, keys):
    tenant = make_key("dashboard tenant", "user")
    browser = logged_in(app.test_client(), keys.admin.secret)
    listing = page(browser, "/admin/tenants")
    assert f'href="/admin/tenants/{tenant.tenant}"' in listing
    path = f"/admin/tenants/{tenant.tenant}"
    shown = page(browser, path)
    assert 'id="quota-form"' in shown and 'data-quota="max_queued_jobs"' in shown
    assert 'data-effective="10000"' in shown

    form = {"weight": "2.5", "max_queued_jobs": "7", "max_running_jobs": "", "submits_per_minute": "30"}
    saved = post_form(browser, f"{path}/quotas", {**form, "max_retained_bytes": "", "artifact_ttl_seconds": ""}, path)
    assert saved.status_code == 303 and saved.headers["Location"].endswith(path)
    assert _tenant(client, keys.admin.secret, tenant.tenant)["overrides"] == {
        "weight": 2.5,
        "max_queued_jobs": 7,
        "submits_per_minute": 30,
    }
    after = page(browser, path)
    assert "Saved the quotas" in after and 'value="7"' in after and 'data-effective="7"' in after
    row = re.search(rf'<tr data-tenant="{tenant.tenant}">(.*?)</tr>', page(browser, "/admin/tenants"), re.S)
    assert row and "weight, max_queued_jobs, submits_per_minute" in row.group(1) and "0 / 7" in row.group(1)

    for field, value, words in [
        ("max_queued_jobs", "-1", "greater than or equal to 0"),
        ("max_queued_jobs", "lots", "must be a whole number"),
        ("max_retained_bytes", "1e30", "must be a whole number"),
        ("weight", "nan", "finite number"),
        ("submits_per_minute", "99999999999", "less than or equal to"),
    ]:
        refused = post_form(browser, f"{path}/quotas", {**form, field: value}, path)
        text = refused.get_data(as_text=True)
        assert refused.status_code == 422, (field, value, text[:2000])
        errors = re.search(r'id="quota-errors"[^>]*>(.*?)</div>\s*</div>', text, re.S)
        assert errors and field in errors.group(1) and words in errors.group(1), (field, value)
        assert f'value="{value}"' in text  # the form keeps what was typed
    assert _tenant(client, keys.admin.secret, tenant.tenant)["overrides"]["max_queued_jobs"] == 7

    # Without the CSRF token: refused, nothing changed. An unknown tenant: 404.
    assert_problem(browser.post(f"{path}/quotas", data={"max_queued_jobs": "1"}), 403)
    missing = post_form(browser, "/admin/tenants/ten_doesnotexist/quotas", {"weight": "1"}, path)
    assert missing.status_code == 404
    assert browser.get("/admin/tenants/ten_doesnotexist", headers=HTML).status_code == 404

    # Every field empty: every override cleared.
    cleared = post_form(browser, f"{path}/quotas", {}, path)
    assert cleared.status_code == 303
    assert _tenant(client, keys.admin.secret, tenant.tenant)["overrides"] == {}
