"""The admin dashboard in a real headless Chromium (Debian's, driven by Playwright) against gunicorn.

The API runs as ``gpujobs api`` with two gunicorn processes, so a session made by one must be
honoured by the other (the shared session secret). Screenshots of every page are kept under
``test-artifacts/admin/``. No browser is a failure, never a skip: ``make test`` installs one.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gpujobs.harness.processes import Stack
from tests.integration.client import auth, get_job, upload, wait_for
from tests.integration.conftest import ROOT

ARTIFACTS = ROOT / "test-artifacts" / "admin"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """Debian's Chromium (``make chromium`` installs it); GPUJOBS_TEST_CHROMIUM names another binary."""
    for candidate in (os.environ.get("GPUJOBS_TEST_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(
        "No Chromium for the browser tests: install Debian's (`make chromium`, i.e. `apt-get install -y chromium`) "
        "or set GPUJOBS_TEST_CHROMIUM to a Chromium binary.",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def api_server(services: Any, cluster: Any) -> Iterator[str]:
    stack = Stack(dict(os.environ), services.root / "logs", label="admin-browser")
    try:
        _, base_url = stack.start_api(workers=2)
        yield base_url
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: `pip install -e '.[test]'` installs it.", pytrace=False)
    executable = chromium_path()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, timeout=60_000)
        except Exception as exc:
            pytest.fail(f"Chromium at {executable} did not start: {exc}", pytrace=False)
        yield launched
        launched.close()


@pytest.fixture
def expected_console_errors() -> list[str]:
    """Substrings of browser console errors that a test causes on purpose (e.g. a refused action's 403)."""
    return []


@pytest.fixture
def page(browser: Any, expected_console_errors: list[str]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860}, locale="en-US")
    context.set_default_timeout(30_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield tab
    context.close()
    # A CSP violation or a script error shows in the console: the pages must not have any.
    unexpected = [e for e in errors if not any(allowed in e for allowed in expected_console_errors)]
    assert not unexpected, unexpected


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def log_in(page: Any, base_url: str, key: str) -> None:
    page.goto(f"{base_url}/admin/")
    page.wait_for_url("**/admin/login**")
    page.fill("#key", key)
    page.click("button[type=submit]")


def logged_in(page: Any, base_url: str, key: str) -> Any:
    log_in(page, base_url, key)
    page.wait_for_url(f"{base_url}/admin/")
    page.wait_for_selector("#cards")
    return page


def picture() -> bytes:
    from tests.integration.test_segmentation import picture as shapes

    return shapes(96, 72, seed=3)


def test_an_admin_watches_a_segmentation_job_finish_and_sees_its_overlay(page, api_server, client, keys, gpu_worker):
    admin = keys.admin.secret
    page.goto(f"{api_server}/admin/")
    page.wait_for_url("**/admin/login**")
    shot(page, "login")
    logged_in(page, api_server, admin)

    # The Jobs page is open (and refreshing itself) when the job is submitted.
    page.goto(f"{api_server}/admin/jobs?type=segmentation")
    uploaded = upload(client, admin, picture())
    assert uploaded.status_code == 201, uploaded.get_data(as_text=True)
    submitted = requests.post(
        f"{api_server}/v1/jobs",
        json={"type": "segmentation", "input": {"image": uploaded.get_json()["id"], "threshold": 0}},
        headers=auth(admin),
        timeout=30,
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    page.wait_for_selector(f'tr[data-job="{job_id}"]', timeout=30_000)  # appeared without a reload
    row = f'tr[data-job="{job_id}"][data-status="succeeded"]'
    page.wait_for_selector(row, timeout=180_000)  # the first job loads the demo model
    assert wait_for(client, admin, job_id, "succeeded", timeout=5)["output"]["instances"] is not None
    shot(page, "jobs")

    page.click(f'{row} a[href="/admin/jobs/{job_id}"]')
    page.wait_for_url(f"**/admin/jobs/{job_id}")
    overlay = page.locator('figure[data-artifact="overlay.png"] img')
    overlay.wait_for()
    # The overlay is really there: the browser fetched the presigned URL and decoded a 96×72 PNG.
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle(), timeout=30_000)
    assert overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [96, 72]
    assert page.locator('figure[data-artifact="instance_map.png"] img').count() == 1
    assert page.locator("#inputs img").count() == 1  # the input image, beside the outputs
    for event in ("queued", "claimed", "stored", "succeeded"):
        assert page.locator(f'#timeline tr[data-event="{event}"]').count() >= 1, event
    shot(page, "job")

    for name, path, ready in (
        ("overview", "/admin/", "#throughput svg"),
        ("workers", "/admin/workers", "#workers"),
        ("tenants", "/admin/tenants", "#tenants"),
        ("keys", "/admin/keys", "#keys"),
    ):
        page.goto(f"{api_server}{path}")
        page.wait_for_selector(ready)
        shot(page, name)
    page.goto(f"{api_server}/admin/workers")
    assert page.locator(f'tr[data-state="alive"] >> text={gpu_worker.node}').count() >= 1
    page.goto(f"{api_server}/admin/")
    assert page.locator("#by-type >> text=segmentation").count() >= 1


def test_a_failed_job_shows_its_error_and_traceback(page, api_server, client, keys, gpu_worker):
    admin = keys.admin.secret
    response = requests.post(
        f"{api_server}/v1/jobs", json={"type": "diagnostic", "input": {"fail": True}}, headers=auth(admin), timeout=30
    )
    job_id = response.json()["id"]
    wait_for(client, admin, job_id, "failed")
    logged_in(page, api_server, admin)
    page.goto(f"{api_server}/admin/jobs/{job_id}")
    assert "diagnostic_failure" in page.inner_text("#error")
    assert "Traceback (most recent call last)" in page.inner_text("#traceback")
    shot(page, "job-failed")


def test_a_user_key_cannot_log_in(page, expected_console_errors, api_server, keys):
    expected_console_errors.append("status of 403")  # the refused login answers 403, as it should
    log_in(page, api_server, keys.user_a.secret)
    page.wait_for_selector("#login-error")
    assert "is a user key" in page.inner_text("#login-error")
    assert "/admin/login" in page.url
    page.goto(f"{api_server}/admin/jobs")
    page.wait_for_url("**/admin/login**")  # still not logged in
    shot(page, "login-refused")


def test_an_action_without_the_csrf_token_is_refused(
    page, expected_console_errors, api_server, client, keys, gpu_worker
):
    admin = keys.admin.secret
    expected_console_errors.append("status of 403")
    response = requests.post(
        f"{api_server}/v1/jobs",
        json={"type": "diagnostic", "input": {"steps": 100, "sleep_seconds": 60}},
        headers=auth(admin),
        timeout=30,
    )
    job_id = response.json()["id"]
    wait_for(client, admin, job_id, "running")
    logged_in(page, api_server, admin)
    page.goto(f"{api_server}/admin/jobs/{job_id}")

    # A request with the session's cookie but no token (what a cross-site form would send).
    refused = page.request.post(f"{api_server}/admin/jobs/{job_id}/cancel", form={"reason": "none"})
    assert refused.status == 403
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "CSRF" in refused.json()["title"]
    # The page's own form, with its token field taken out.
    page.locator("#cancel-form input[name=csrf_token]").evaluate("input => input.remove()")
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#cancel-button")
    page.wait_for_selector("#problem")
    assert "CSRF" in page.inner_text("#problem")
    shot(page, "csrf-refused")
    assert get_job(client, admin, job_id)["status"] == "running"
    assert get_job(client, admin, job_id)["progress"]["step"] < 100
    client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(admin))  # done with it


def test_cancel_a_queued_job_from_its_page(page, api_server, client, keys, no_gpu_worker):
    admin = keys.admin.secret
    response = requests.post(
        f"{api_server}/v1/jobs", json={"type": "diagnostic", "input": {}}, headers=auth(admin), timeout=30
    )
    job_id = response.json()["id"]
    logged_in(page, api_server, admin)
    page.goto(f"{api_server}/admin/jobs?status=queued")
    page.wait_for_selector(f'tr[data-job="{job_id}"][data-status="queued"]')
    page.click(f'a[href="/admin/jobs/{job_id}"]')
    page.wait_for_selector("#cancel-button")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    page.click("#cancel-button")
    page.wait_for_selector(".status-canceled")
    assert dialogs == ["Cancel this job?"]
    assert "Canceled: the job will not run." in page.inner_text(".flash")
    assert page.locator("#cancel-button").count() == 0 and page.locator("#retry-button").count() == 1
    shot(page, "job-canceled")
    answer = requests.get(f"{api_server}/v1/jobs/{job_id}", headers=auth(admin), timeout=10)
    assert answer.json()["status"] == "canceled"
    assert get_job(client, admin, job_id)["attempts"] == 0  # it never ran


def test_a_running_jobs_page_follows_its_event_stream(page, api_server, keys, gpu_worker):
    """Progress moves between the page's 5 s refreshes: it comes from /admin/jobs/<id>/events (no CSP error)."""
    admin = keys.admin.secret
    body = {"type": "diagnostic", "input": {"steps": 40, "sleep_seconds": 20}}  # a step every 0.5 s
    job_id = requests.post(f"{api_server}/v1/jobs", json=body, headers=auth(admin), timeout=30).json()["id"]
    deadline = time.monotonic() + 20
    while requests.get(f"{api_server}/v1/jobs/{job_id}", headers=auth(admin), timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.2)
    logged_in(page, api_server, admin)
    streams: list[str] = []
    page.on("request", lambda request: streams.append(request.url) if "/events" in request.url else None)
    page.goto(f"{api_server}/admin/jobs/{job_id}")
    loaded = time.monotonic()
    first = int(page.get_attribute("#progress progress", "value") or 0)
    page.wait_for_function(
        f"() => Number(document.querySelector('#progress progress').value) >= {first + 3}", timeout=4000
    )
    assert time.monotonic() - loaded < 4.5  # before the first refresh (5 s): the stream moved it
    assert streams and f"/admin/jobs/{job_id}/events" in streams[0]
    requests.post(f"{api_server}/v1/jobs/{job_id}/cancel", headers=auth(admin), timeout=10)
    page.wait_for_selector(".status-canceled", timeout=15_000)  # the stream's last events refresh the page
