"""The admin dashboard through Flask's test client: login, session cookie, CSRF, pages, actions, the retry transition.

The browser tests (``test_admin_browser.py``) drive the same pages in Chromium against gunicorn.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import stat

from tests.integration import webhook_fixtures
from tests.integration.admin_client import HTML, csrf_of, logged_in, login, page, post_form
from tests.integration.client import assert_problem, auth, diagnostic, get_job, kinds, wait_for
from tests.integration.conftest import make_key
from tests.integration.webhook_fixtures import deliveries, job_with_webhook, wait_deliveries

receiver = webhook_fixtures.receiver
webhooks_worker = webhook_fixtures.webhooks_worker


def _cookie_header(response) -> str:
    [cookie] = [v for k, v in response.headers.items() if k == "Set-Cookie" and v.startswith("gpujobs_admin=")]
    return cookie


# --- login, the session cookie, logout ---------------------------------------------------------------------


def test_an_admin_key_logs_in_with_a_safe_session_cookie(app, keys):
    client = app.test_client()
    response = login(client, keys.admin.secret, next_path="/admin/workers")
    assert response.status_code == 303, response.get_data(as_text=True)
    assert response.headers["Location"].endswith("/admin/workers")
    cookie = _cookie_header(response)
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
    assert "httponly" in flags and flags["samesite"].lower() == "samesite=lax" and flags["path"] == "Path=/admin"
    assert "secure" not in flags  # plain http here
    assert keys.admin.secret not in cookie  # the session names the key's id, never the key
    assert "Workers" in page(client, "/admin/workers")

    # Over https (directly, or behind a proxy that says so) the cookie is Secure.
    secure = app.test_client().get("/admin/login", base_url="https://localhost", headers=HTML)
    assert "secure" in _cookie_header(secure).lower()
    proxied = app.test_client().get("/admin/login", headers={**HTML, "X-Forwarded-Proto": "https"})
    assert "secure" in _cookie_header(proxied).lower()


def test_a_user_key_cannot_log_in(app, keys):
    client = app.test_client()
    response = login(client, keys.user_a.secret)
    assert response.status_code == 403
    text = response.get_data(as_text=True)
    assert "is a user key" in text and "needs an admin key" in text
    # Not logged in: pages send the browser to the login form.
    redirect = client.get("/admin/", headers=HTML)
    assert redirect.status_code == 303 and "/admin/login" in redirect.headers["Location"]


def test_an_unknown_or_empty_key_is_refused(app):
    client = app.test_client()
    unknown = login(client, "gpj_not-a-key")
    assert unknown.status_code == 401 and "unknown or has been revoked" in unknown.get_data(as_text=True)
    empty = login(client, "   ")
    assert empty.status_code == 422 and "Enter an admin API key" in empty.get_data(as_text=True)


def test_pages_and_actions_need_a_session(app, client, keys):
    job = diagnostic(client, keys.admin.secret)
    anonymous = app.test_client()
    pages = ("/admin/", "/admin/workers", "/admin/jobs", f"/admin/jobs/{job['id']}", "/admin/tenants", "/admin/keys")
    for path in pages:
        response = anonymous.get(path, headers=HTML)
        assert response.status_code == 303, path
        assert response.headers["Location"].startswith("/admin/login?next="), response.headers["Location"]
    assert anonymous.get("/admin", headers=HTML).status_code in (301, 308)  # to /admin/
    response = anonymous.post(f"/admin/jobs/{job['id']}/cancel", data={"csrf_token": "x"})
    assert response.status_code == 303 and response.headers["Location"] == "/admin/login"


def test_the_login_form_itself_needs_its_csrf_token(app, keys):
    client = app.test_client()
    client.get("/admin/login")
    response = client.post("/admin/login", data={"key": keys.admin.secret})
    assert_problem(response, 403)
    assert client.get("/admin/", headers=HTML).status_code == 303  # not logged in


def test_next_is_never_an_open_redirect(app, keys):
    for target in ("https://evil.example/admin/", "//evil.example/admin/", "/v1/jobs", "/admin\\@evil", "javascript:x"):
        response = login(app.test_client(), keys.admin.secret, next_path=target)
        assert response.status_code == 303
        assert response.headers["Location"] == "/admin/", (target, response.headers["Location"])


def test_logout_ends_the_session(app, keys):
    client = logged_in(app.test_client(), keys.admin.secret)
    response = post_form(client, "/admin/logout")
    assert response.status_code == 303 and response.headers["Location"] == "/admin/login"
    assert client.get("/admin/", headers=HTML).status_code == 303


def test_a_revoked_keys_session_ends_at_its_next_request(app, client, keys):
    admin = make_key("admin to revoke", "admin")
    browser = logged_in(app.test_client(), admin.secret)
    page(browser, "/admin/jobs")
    assert client.delete(f"/v1/keys/{admin.id}", headers=auth(keys.admin.secret)).status_code == 200
    response = browser.get("/admin/jobs", headers=HTML)
    assert response.status_code == 303 and "/admin/login" in response.headers["Location"]
    assert "its key was revoked" in page(browser, response.headers["Location"])
    # And its session is gone for good: logging in with the revoked key fails.
    assert login(browser, admin.secret).status_code == 401


# --- CSRF --------------------------------------------------------------------------------------------------


def test_actions_without_the_csrf_token_are_refused(app, client, keys, no_gpu_worker):
    job = diagnostic(client, keys.admin.secret)  # stays queued: nothing serves the gpu queue
    browser = logged_in(app.test_client(), keys.admin.secret)
    cancel = f"/admin/jobs/{job['id']}/cancel"

    missing = browser.post(cancel, data={})
    body = assert_problem(missing, 403)
    assert "CSRF" in body["title"]
    wrong = browser.post(cancel, data={"csrf_token": "not-the-token"})
    assert "invalid" in assert_problem(wrong, 403)["title"].lower()
    # A browser gets the same refusal as a page.
    html = browser.post(cancel, data={}, headers=HTML)
    assert html.status_code == 403 and "CSRF" in html.get_data(as_text=True)
    # A token from another session does not work either.
    other = logged_in(app.test_client(), keys.admin.secret)
    foreign = csrf_of(page(other, "/admin/"))
    assert_problem(browser.post(cancel, data={"csrf_token": foreign}), 403)
    assert get_job(client, keys.admin.secret, job["id"])["status"] == "queued"

    # With the token, the same action works.
    done = post_form(browser, cancel)
    assert done.status_code == 303 and done.headers["Location"].endswith(f"/admin/jobs/{job['id']}")
    assert get_job(client, keys.admin.secret, job["id"])["status"] == "canceled"
    assert "Canceled: the job will not run." in page(browser, done.headers["Location"])
    # Canceling it again is a precise 409, not a 500.
    assert_problem(_post_json(browser, cancel), 409)


def _post_json(browser, path: str):
    token = csrf_of(page(browser, "/admin/"))
    return browser.post(path, data={"csrf_token": token}, headers={"Accept": "application/json"})


# --- pages -------------------------------------------------------------------------------------------------


def test_every_page_renders_and_a_failed_job_shows_its_traceback(app, client, keys, gpu_worker):
    admin = keys.admin.secret
    ok = diagnostic(client, admin, steps=2)
    bad = diagnostic(client, admin, fail=True)
    wait_for(client, admin, ok["id"], "succeeded")
    failed = wait_for(client, admin, bad["id"], "failed")
    assert "traceback" not in failed and "Traceback" not in str(failed)  # never in the public answer

    browser = logged_in(app.test_client(), admin)
    for window in ("1h", "6h", "24h", "7d", "30d"):
        overview = page(browser, f"/admin/?window={window}")
        assert "<svg" in overview and 'id="percentiles"' in overview
    assert bad["id"] in page(browser, "/admin/")  # among the latest failures
    workers = page(browser, "/admin/workers")
    assert gpu_worker.node in workers and 'data-state="alive"' in workers
    jobs = page(browser, "/admin/jobs?status=failed&type=diagnostic")
    assert bad["id"] in jobs and ok["id"] not in jobs
    tenant_jobs = page(browser, f"/admin/jobs?tenant={keys.admin.tenant}&since=2000-01-01T00:00")
    assert ok["id"] in tenant_jobs
    assert ok["id"] not in page(browser, "/admin/jobs?until=2000-01-01T00:00")

    job_page = page(browser, f"/admin/jobs/{bad['id']}")
    assert "diagnostic_failure" in job_page and 'id="traceback"' in job_page and "DiagnosticFailure" in job_page
    assert 'id="retry-form"' in job_page and 'id="cancel-form"' not in job_page
    ok_page = page(browser, f"/admin/jobs/{ok['id']}")
    assert 'data-artifact="diagnostic.json"' in ok_page and "X-Amz-Signature" in ok_page
    for event in ("queued", "claimed", "stored", "succeeded"):
        assert f'data-event="{event}"' in ok_page, event

    tenants = page(browser, "/admin/tenants?period=7d")
    assert keys.admin.tenant in tenants
    assert keys.user_a.id in page(browser, "/admin/keys?limit=100") or "Older keys" in page(browser, "/admin/keys")

    response = browser.get("/admin/", headers=HTML)
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert response.headers["Cache-Control"] == "no-store" and response.headers["X-Frame-Options"] == "DENY"


def test_search_by_id(app, client, keys):
    job = diagnostic(client, keys.admin.secret)
    browser = logged_in(app.test_client(), keys.admin.secret)
    exact = browser.get(f"/admin/jobs?q={job['id']}", headers=HTML)
    assert exact.status_code == 303 and exact.headers["Location"].endswith(f"/admin/jobs/{job['id']}")
    prefix = page(browser, f"/admin/jobs?q={job['id'][:12]}")
    assert job["id"] in prefix


def test_bad_input_is_a_precise_4xx(app, keys):
    browser = logged_in(app.test_client(), keys.admin.secret)
    json = {"Accept": "application/json"}
    cases = [
        ("/admin/jobs?status=bogus", 422, ["query", "status"]),
        ("/admin/jobs?since=yesterday", 422, ["query", "since"]),
        ("/admin/jobs?until=0001-01-01T00:00%2B05:00", 422, ["query", "until"]),
        ("/admin/jobs?tenant=ten%00x", 422, ["query", "tenant"]),
        ("/admin/jobs?q=job%20x", 422, ["query", "q"]),
        ("/admin/jobs?limit=0", 422, ["query", "limit"]),
        ("/admin/jobs?cursor=garbage", 422, ["query", "cursor"]),
        ("/admin/?window=2y", 422, ["query", "window"]),
        ("/admin/tenants?period=forever", 422, ["query", "period"]),
        ("/admin/jobs/job_doesnotexist", 404, None),
        ("/admin/jobs/job%00x", 404, None),
        ("/admin/nowhere", 404, None),
    ]
    for path, status, loc in cases:
        assert_problem(browser.get(path, headers=json), status, loc)
    html = browser.get("/admin/jobs?status=bogus", headers=HTML)
    assert html.status_code == 422 and "must be one of" in html.get_data(as_text=True)
    for path in (
        "/admin/jobs/job_nope/cancel",
        "/admin/jobs/job_nope/retry",
        "/admin/keys/key_nope/revoke",
        "/admin/jobs/job_nope/webhooks/msg_nope/redeliver",
    ):
        token = csrf_of(page(browser, "/admin/"))
        assert_problem(browser.post(path, data={"csrf_token": token}, headers=json), 404)


# --- keys --------------------------------------------------------------------------------------------------


def test_create_and_revoke_a_key_from_the_dashboard(app, client, keys):
    browser = logged_in(app.test_client(), keys.admin.secret)
    created = post_form(browser, "/admin/keys", {"name": "made in the dashboard", "role": "user"}, "/admin/keys")
    assert created.status_code == 201
    text = created.get_data(as_text=True)
    plaintext = re.search(r'id="new-key-value">(gpj_[^<]+)<', text).group(1)
    assert client.get("/v1/jobs", headers=auth(plaintext)).status_code == 200
    listed = client.get("/v1/keys?limit=100", headers=auth(keys.admin.secret)).get_json()["items"]
    [row] = [k for k in listed if k["name"] == "made in the dashboard"]
    assert f'data-key="{row["id"]}"' in text

    shared = post_form(browser, "/admin/keys", {"name": "same tenant", "tenant": row["tenant"]}, "/admin/keys")
    assert shared.status_code == 201 and row["tenant"] in shared.get_data(as_text=True)

    for form, message in [
        ({"name": ""}, "name"),
        ({"name": "x", "role": "root"}, "role"),
        ({"name": "x", "tenant": "ten_doesnotexist"}, "no tenant"),
        ({"name": "x", "tenant": "not a tenant"}, "tenant"),
    ]:
        refused = post_form(browser, "/admin/keys", form, "/admin/keys")
        assert refused.status_code == 422 and message in refused.get_data(as_text=True), form

    revoked = post_form(browser, f"/admin/keys/{row['id']}/revoke", token_from="/admin/keys")
    assert revoked.status_code == 303
    assert_problem(client.get("/v1/jobs", headers=auth(plaintext)), 401)


# --- the session secret --------------------------------------------------------------------------------------


def _secret_in(path: str, results) -> None:  # in a child process
    from pathlib import Path

    from api.admin.session import persisted_secret

    results.put(persisted_secret(Path(path)))


def test_the_session_secret_is_made_once_and_shared_by_every_process(tmp_path, services, keys):
    import api
    from db.settings import Settings

    path = tmp_path / "var" / "session-secret"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    children = [context.Process(target=_secret_in, args=(str(path), results)) for _ in range(4)]
    for child in children:
        child.start()
    found = {results.get(timeout=60) for _ in children}
    for child in children:
        child.join(30)
    assert len(found) == 1 and path.read_text() == found.pop()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name != "session-secret"]  # no drafts left behind

    # Two API processes with the same var_dir accept each other's session cookies.
    first = api.create_app(Settings(var_dir=tmp_path / "var"))
    second = api.create_app(Settings(var_dir=tmp_path / "var"))
    browser = logged_in(first.test_client(), keys.admin.secret)
    cookie = browser.get_cookie("gpujobs_admin", path="/admin")
    other = second.test_client()
    other.set_cookie("gpujobs_admin", cookie.value, path="/admin")
    assert "Overview" in page(other, "/admin/")
    # A set GPUJOBS_SESSION_SECRET wins over the file.
    assert api.create_app(Settings(var_dir=tmp_path / "var", session_secret="s3cret")).secret_key == "s3cret"


# --- retry (a new attempt of the same job) and redelivery --------------------------------------------------------


def test_retry_runs_a_failed_job_again_and_its_webhook_completes_again(
    app, client, keys, gpu_worker, webhooks_worker, receiver
):
    admin = keys.admin.secret
    webhooks_worker()
    job = job_with_webhook(client, admin, receiver.url("/retry"), fail=True)
    first = wait_for(client, admin, job["id"], "failed")
    assert first["attempts"] == 1
    wait_deliveries(client, admin, job["id"], lambda found: [d["status"] for d in found] == ["delivered"])

    browser = logged_in(app.test_client(), admin)
    retried = post_form(browser, f"/admin/jobs/{job['id']}/retry")
    assert retried.status_code == 303
    second = wait_for(client, admin, job["id"], "failed", until=lambda j: j["attempts"] == 2)
    assert second["error"]["code"] == "diagnostic_failure"
    assert kinds(job["id"]) == ["queued", "claimed", "failed", "retried", "claimed", "failed"]

    # Each completion is an event of its own: a second `completed` delivery, with its own webhook-id.
    found = wait_deliveries(
        client, admin, job["id"], lambda found: [d["status"] for d in found] == ["delivered", "delivered"]
    )
    assert [d["event"] for d in found] == ["completed", "completed"] and found[0]["id"] != found[1]["id"]
    bodies = [r.json() for r in receiver.wait_for("/retry", lambda got: len(got) >= 2, 30)]
    assert [b["data"]["attempts"] for b in bodies[:2]] == [1, 2]

    # The job page shows both deliveries and the retry; redelivering one sends it again.
    job_page = page(browser, f"/admin/jobs/{job['id']}")
    assert 'data-event="retried"' in job_page and all(d["id"] in job_page for d in found)
    redelivered = post_form(browser, f"/admin/jobs/{job['id']}/webhooks/{found[0]['id']}/redeliver")
    assert redelivered.status_code == 303
    again = wait_deliveries(
        client, admin, job["id"], lambda ds: ds[0]["attempts"] == 2 and ds[0]["status"] == "delivered"
    )
    assert again[0]["id"] == found[0]["id"]
    assert len(deliveries(client, admin, job["id"])) == 2

    # Only failed or canceled jobs can be retried.
    ok = diagnostic(client, admin)
    wait_for(client, admin, ok["id"], "succeeded")
    assert_problem(_post_json(browser, f"/admin/jobs/{ok['id']}/retry"), 409)


def test_the_retry_transition_is_guarded(client, keys, no_gpu_worker):
    from sqlalchemy import select

    from db import transitions
    from db.models import Job
    from db.session import session_scope

    job = diagnostic(client, keys.admin.secret)
    with session_scope() as session:
        assert not transitions.retry(session, job["id"], 2, "a test")  # queued: nothing to retry
        assert transitions.request_cancel(session, job["id"]).value == "canceled"
    with session_scope() as session:
        assert transitions.retry(session, job["id"], 2, "a test")
        # Read in the same transaction: the reconciler may dispatch it as soon as this commits.
        row = session.execute(
            select(Job.status, Job.max_attempts, Job.dispatched_at, Job.finished_at, Job.error).where(
                Job.id == job["id"]
            )
        ).one()
        # Never run (0 attempts) + a new job's budget of 2; dispatched_at NULL, so the reconciler sends it.
        assert (row.status, row.max_attempts, row.dispatched_at, row.finished_at, row.error) == (
            "queued",
            2,
            None,
            None,
            None,
        )
    with session_scope() as session:
        assert not transitions.retry(session, job["id"], 2, "a test")  # queued again: nothing to retry
    assert kinds(job["id"])[:3] == ["queued", "canceled", "retried"]
