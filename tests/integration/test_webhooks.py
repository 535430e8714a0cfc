"""Webhooks: signed (checked with the `standardwebhooks` reference package), retried, recorded, sent once.

A real HTTP receiver listens on loopback in the test process; a real Celery worker on the
`webhooks` queue sends to it, with retry timings shrunk by settings; the session's beat runs the
sweep that finds due deliveries. Each test starts its own webhooks worker (and stops it), so a
test can also have none running at all.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from datetime import datetime

import pytest
import requests
from standardwebhooks import Webhook, WebhookVerificationError

from tests.integration import webhook_fixtures
from tests.integration.client import auth, events, get_job, wait_for
from tests.integration.webhook_fixtures import (
    deliveries,
    job_with_webhook,
    parse_time,
    secret_of,
    wait_deliveries,
    without_urls,
)
from tests.integration.webhook_receiver import Reply

receiver = webhook_fixtures.receiver
webhooks_worker = webhook_fixtures.webhooks_worker


# --- events, order, signatures --------------------------------------------------------------------


def test_start_progress_and_one_completed_arrive_in_order_each_signed(
    client, keys, gpu_worker, webhooks_worker, receiver
):
    admin = keys.admin.secret
    secret = secret_of(client, admin)
    webhooks_worker()
    job = job_with_webhook(
        client, admin, receiver.url("/events"), ["start", "progress", "completed"], steps=10, sleep_seconds=5
    )

    got = receiver.wait_for("/events", lambda found: any(r.json()["type"] == "job.completed" for r in found), 60)
    time.sleep(1.5)  # anything sent twice would arrive by now
    got = receiver.at("/events")
    bodies = [Webhook(secret).verify(r.body, r.headers) for r in got]  # raises unless the signature is right
    types = [body["type"] for body in bodies]
    assert types[0] == "job.start" and types[-1] == "job.completed", types
    assert types.count("job.start") == 1 and types.count("job.completed") == 1, types
    progress = [body for body in bodies if body["type"] == "job.progress"]
    assert len(progress) >= 2, types
    assert set(types) == {"job.start", "job.progress", "job.completed"}
    assert all(body["data"]["id"] == job["id"] for body in bodies)

    # One webhook-id per event; the start shows the job running, progress grows, at most one per 2 s.
    assert len({r.headers["webhook-id"] for r in got}) == len(got)
    assert bodies[0]["data"]["status"] == "running" and bodies[0]["data"]["attempts"] == 1
    steps = [body["data"]["progress"]["step"] for body in progress]
    assert steps == sorted(steps) and steps[-1] > steps[0], steps
    times = [parse_time(body["timestamp"]) for body in progress]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(gap >= 1.95 for gap in gaps), gaps

    # The completed body is the job exactly as GET shows it, with download URLs that work.
    final = get_job(client, admin, job["id"])
    completed = bodies[-1]["data"]
    assert final["status"] == "succeeded"
    assert without_urls(completed) == without_urls(final)
    artifact = completed["output"]["artifact"]
    download = requests.get(artifact["url"], timeout=10)
    assert download.status_code == 200 and hashlib.sha256(download.content).hexdigest() == artifact["sha256"]

    # Every delivery is recorded, with its one attempt.
    listed = deliveries(client, admin, job["id"])
    assert [d["event"] for d in listed] == [t.removeprefix("job.") for t in types]
    for delivery, request in zip(listed, got, strict=True):
        assert delivery["id"] == request.headers["webhook-id"]
        assert delivery["status"] == "delivered" and delivery["attempts"] == 1 and delivery["next_attempt_at"] is None
        [attempt] = delivery["history"]
        assert attempt["status_code"] == 200 and attempt["response_excerpt"] == "ok" and attempt["error"] is None


def test_the_default_filter_sends_only_completed_and_a_failed_job_completes_too(
    client, keys, gpu_worker, webhooks_worker, receiver
):
    admin = keys.admin.secret
    webhooks_worker()
    job = job_with_webhook(client, admin, receiver.url("/failed"), steps=3, sleep_seconds=0.3, fail=True)

    [request] = receiver.wait_for("/failed", lambda found: len(found) >= 1, 30)
    body = Webhook(secret_of(client, admin)).verify(request.body, request.headers)
    assert body["type"] == "job.completed"
    assert body["data"]["status"] == "failed" and body["data"]["error"]["code"] == "diagnostic_failure"
    assert [d["event"] for d in deliveries(client, admin, job["id"])] == ["completed"]


def test_a_job_canceled_while_queued_sends_completed(client, keys, no_gpu_worker, webhooks_worker, receiver):
    admin = keys.admin.secret
    webhooks_worker()
    job = job_with_webhook(client, admin, receiver.url("/canceled"), ["start", "completed"])
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(admin))
    assert response.status_code == 202, response.get_data(as_text=True)

    [request] = receiver.wait_for("/canceled", lambda found: len(found) >= 1, 30)
    assert request.json()["type"] == "job.completed" and request.json()["data"]["status"] == "canceled"
    assert [d["event"] for d in deliveries(client, admin, job["id"])] == ["completed"]  # it never started


# --- retries ---------------------------------------------------------------------------------------


def test_500_twice_then_200_is_three_attempts_with_one_webhook_id_and_growing_delays(
    client, keys, gpu_worker, webhooks_worker, receiver
):
    admin = keys.admin.secret
    secret = secret_of(client, admin)
    webhooks_worker()  # first retry after ~1 s (0.75–1 s with jitter), the next after ~2 s
    receiver.script("/flaky", Reply(500, body=b"database down"), Reply(500), Reply(200))
    job = job_with_webhook(client, admin, receiver.url("/flaky"))

    got = receiver.wait_for("/flaky", lambda found: len(found) >= 3, 30)
    time.sleep(1.5)
    got = receiver.at("/flaky")
    assert len(got) == 3
    assert len({r.headers["webhook-id"] for r in got}) == 1
    for request in got:
        Webhook(secret).verify(request.body, request.headers)
    first_wait, second_wait = got[1].at - got[0].at, got[2].at - got[1].at
    assert 0.7 <= first_wait < second_wait, (first_wait, second_wait)
    assert second_wait >= 1.45, second_wait

    [delivery] = wait_deliveries(client, admin, job["id"], lambda ds: ds and ds[0]["status"] == "delivered")
    assert delivery["id"] == got[0].headers["webhook-id"]
    assert delivery["attempts"] == 3
    assert [a["status_code"] for a in delivery["history"]] == [500, 500, 200]
    assert [a["number"] for a in delivery["history"]] == [1, 2, 3]
    assert delivery["history"][0]["response_excerpt"] == "database down"
    assert delivery["history"][0]["error"] == "the receiver answered 500"
    assert delivery["last_error"] is None and delivery["delivered_at"] is not None


def test_410_gone_stops_the_retries(client, keys, gpu_worker, webhooks_worker, receiver):
    admin = keys.admin.secret
    webhooks_worker()
    receiver.script("/gone", Reply(410, body=b"no such hook"))
    job = job_with_webhook(client, admin, receiver.url("/gone"))

    [delivery] = wait_deliveries(client, admin, job["id"], lambda ds: ds and ds[0]["status"] != "pending")
    time.sleep(3)  # longer than the first two retry delays
    assert len(receiver.at("/gone")) == 1
    [delivery] = deliveries(client, admin, job["id"])
    assert delivery["status"] == "failed" and delivery["next_attempt_at"] is None
    assert delivery["attempts"] == 1 and delivery["history"][0]["status_code"] == 410
    assert "410" in delivery["last_error"] and "not retried" in delivery["last_error"]


def test_a_redirect_is_a_failure_never_followed_retried_until_the_horizon(
    client, keys, gpu_worker, webhooks_worker, receiver
):
    admin = keys.admin.secret
    webhooks_worker(webhook_retry_horizon_seconds="4")
    elsewhere = receiver.url("/elsewhere")
    receiver.script("/moved", Reply(301, headers={"Location": elsewhere}))
    job = job_with_webhook(client, admin, receiver.url("/moved"))

    [delivery] = wait_deliveries(client, admin, job["id"], lambda ds: ds and ds[0]["status"] != "pending", 30)
    assert receiver.at("/elsewhere") == []
    assert delivery["status"] == "gave_up", delivery
    history = delivery["history"]
    assert len(history) >= 3 and all(a["status_code"] == 301 for a in history), history
    assert "redirects are not followed" in history[0]["error"] and elsewhere in history[0]["error"]
    assert "gave up" in delivery["last_error"]
    # The last attempt is made at the horizon (4 s after the event), not before, and not long after.
    last_at = (parse_time(history[-1]["at"]) - parse_time(delivery["created_at"])).total_seconds()
    assert 3.9 <= last_at <= 6.5, last_at
    assert len(receiver.at("/moved")) == len(history)


def test_a_receiver_that_hangs_is_cut_at_the_timeout(client, keys, gpu_worker, webhooks_worker, receiver):
    admin = keys.admin.secret
    webhooks_worker(webhook_timeout_seconds="1", webhook_retry_horizon_seconds="3")
    receiver.script("/hang", Reply(hang=True))
    job = job_with_webhook(client, admin, receiver.url("/hang"))

    [delivery] = wait_deliveries(client, admin, job["id"], lambda ds: ds and ds[0]["attempts"] >= 1, 30)
    first = delivery["history"][0]
    assert first["status_code"] is None
    assert first["error"] == "no answer within 1 s"
    assert 0.9 <= first["duration_seconds"] < 2.5, first
    assert receiver.at("/hang"), "the request never reached the receiver"


def test_429_waits_as_long_as_retry_after_asks(client, keys, gpu_worker, webhooks_worker, receiver):
    admin = keys.admin.secret
    webhooks_worker()  # the backoff alone would retry after at most 1 s
    receiver.script("/busy", Reply(429, headers={"Retry-After": "3"}), Reply(200))
    job = job_with_webhook(client, admin, receiver.url("/busy"))

    got = receiver.wait_for("/busy", lambda found: len(found) >= 2, 30)
    assert got[1].at - got[0].at >= 2.9
    [delivery] = wait_deliveries(client, admin, job["id"], lambda ds: ds and ds[0]["status"] == "delivered")
    assert [a["status_code"] for a in delivery["history"]] == [429, 200]


# --- exactly once ----------------------------------------------------------------------------------


def test_a_worker_killed_after_success_before_the_webhook_went_still_leads_to_one_completed(
    client, keys, no_gpu_worker, start_worker, webhooks_worker, receiver
):
    """No webhooks worker runs while the job succeeds and its worker is killed; the queue loses the send
    task too. Only the database row is left: the beat sweep finds it once a webhooks worker is there."""
    from tests.integration.conftest import purge_queue

    admin = keys.admin.secret
    doomed = start_worker()
    job = job_with_webhook(client, admin, receiver.url("/once"), steps=2, sleep_seconds=0.4)
    wait_for(client, admin, job["id"], "succeeded", timeout=30)
    doomed.kill()
    purge_queue("webhooks")

    [pending] = deliveries(client, admin, job["id"])
    assert pending["event"] == "completed" and pending["status"] == "pending" and pending["attempts"] == 0
    assert receiver.at("/once") == []

    webhooks_worker()
    receiver.wait_for("/once", lambda found: len(found) >= 1, 30)
    time.sleep(3)  # several sweeps later, still one
    [request] = receiver.at("/once")
    assert request.json()["type"] == "job.completed" and request.json()["data"]["status"] == "succeeded"
    assert request.headers["webhook-id"] == pending["id"]
    [delivery] = deliveries(client, admin, job["id"])
    assert delivery["status"] == "delivered" and delivery["attempts"] == 1


def test_a_job_run_twice_after_its_worker_died_starts_and_completes_once(
    client, keys, no_gpu_worker, start_worker, webhooks_worker, receiver
):
    admin = keys.admin.secret
    webhooks_worker()
    doomed = start_worker()
    job = job_with_webhook(client, admin, receiver.url("/rerun"), ["start", "completed"], steps=20, sleep_seconds=3)
    wait_for(client, admin, job["id"], "running", until=lambda j: j["progress"]["step"] >= 1)
    doomed.kill()
    start_worker()  # the lease expires, the reconciler requeues the job, this worker runs it again

    done = wait_for(client, admin, job["id"], ("succeeded", "failed"), timeout=60)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert [e["kind"] for e in events(job["id"])].count("claimed") == 2
    receiver.wait_for("/rerun", lambda found: any(r.json()["type"] == "job.completed" for r in found), 30)
    time.sleep(2)
    types = [r.json()["type"] for r in receiver.at("/rerun")]
    assert types == ["job.start", "job.completed"], types
    listed = deliveries(client, admin, job["id"])
    assert [d["event"] for d in listed] == ["start", "completed"]
    assert receiver.at("/rerun")[-1].json()["data"]["attempts"] == 2


# --- the API ---------------------------------------------------------------------------------------


def test_redeliver_sends_the_same_event_again_with_the_same_webhook_id(
    client, keys, gpu_worker, webhooks_worker, receiver
):
    admin = keys.admin.secret
    secret = secret_of(client, admin)
    webhooks_worker()
    job = job_with_webhook(client, admin, receiver.url("/again"))
    [delivery] = wait_deliveries(client, admin, job["id"], lambda ds: ds and ds[0]["status"] == "delivered")

    response = client.post(f"/v1/jobs/{job['id']}/webhooks/{delivery['id']}/redeliver", headers=auth(admin))
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json()["status"] == "pending"

    first, second = receiver.wait_for("/again", lambda found: len(found) >= 2, 30)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery["id"]
    assert Webhook(secret).verify(second.body, second.headers)["type"] == "job.completed"
    [again] = wait_deliveries(
        client, admin, job["id"], lambda ds: ds[0]["status"] == "delivered" and ds[0]["attempts"] == 2
    )
    assert [a["number"] for a in again["history"]] == [1, 2]


def test_another_tenant_sees_neither_the_deliveries_nor_can_redeliver(
    client, keys, gpu_worker, webhooks_worker, receiver
):
    admin = keys.admin.secret
    webhooks_worker()
    job = job_with_webhook(client, admin, receiver.url("/mine"))
    [delivery] = wait_deliveries(client, admin, job["id"], lambda ds: len(ds) == 1)

    from tests.integration.client import assert_problem

    other = keys.user_b.secret
    assert_problem(client.get(f"/v1/jobs/{job['id']}/webhooks", headers=auth(other)), 404)
    redeliver = f"/v1/jobs/{job['id']}/webhooks/{delivery['id']}/redeliver"
    assert_problem(client.post(redeliver, headers=auth(other)), 404)
    assert_problem(client.post(f"/v1/jobs/{job['id']}/webhooks/msg_nope/redeliver", headers=auth(admin)), 404)
    assert_problem(client.get("/v1/jobs/job_nope/webhooks", headers=auth(admin)), 404)


def test_each_tenant_has_its_own_stable_secret_and_the_routes_are_documented(client, keys):
    import base64

    a, b = secret_of(client, keys.user_a.secret), secret_of(client, keys.user_b.secret)
    assert a != b
    assert secret_of(client, keys.user_a.secret) == a
    for secret in (a, b):
        assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) >= 24
    assert client.get("/v1/webhooks/secret").status_code == 401

    paths = client.get("/openapi.json").get_json()["paths"]
    assert "get" in paths["/v1/webhooks/secret"] and "post" in paths["/v1/webhooks/secret/rotate"]
    assert "get" in paths["/v1/jobs/{job_id}/webhooks"]
    assert "post" in paths["/v1/jobs/{job_id}/webhooks/{delivery_id}/redeliver"]


# --- secret rotation -------------------------------------------------------------------------------


def test_after_a_rotation_both_secrets_verify_during_the_grace_period_then_only_the_new_one(
    services, keys, gpu_worker, webhooks_worker, receiver
):
    import api
    from db.settings import get_settings
    from tests.integration.conftest import make_key

    grace = 5.0
    app = api.create_app(get_settings().model_copy(update={"webhook_secret_grace_seconds": grace}))
    client = app.test_client()
    tenant_admin = make_key("rotation admin", "admin").secret  # a tenant of its own: other tests keep theirs
    webhooks_worker()

    old = secret_of(client, tenant_admin)
    response = client.post("/v1/webhooks/secret/rotate", headers=auth(tenant_admin))
    assert response.status_code == 200, response.get_data(as_text=True)
    new = response.get_json()["secret"]
    grace_ends = parse_time(response.get_json()["previous_secret_valid_until"])
    assert new != old and new.startswith("whsec_")
    assert secret_of(client, tenant_admin) == new

    job_with_webhook(client, tenant_admin, receiver.url("/during"))
    [during] = receiver.wait_for("/during", lambda found: len(found) >= 1, 30)
    assert parse_time(during.json()["timestamp"]) < grace_ends, "the test was too slow for its grace period"
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(during.body, during.headers)
    Webhook(old).verify(during.body, during.headers)

    time.sleep(max((grace_ends - datetime.now(grace_ends.tzinfo)).total_seconds(), 0) + 0.5)
    job_with_webhook(client, tenant_admin, receiver.url("/after"))
    [after] = receiver.wait_for("/after", lambda found: len(found) >= 1, 30)
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    Webhook(new).verify(after.body, after.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(after.body, after.headers)


# --- the schedule ----------------------------------------------------------------------------------


def test_the_default_schedule_retries_for_a_day_with_growing_jittered_waits():
    """Walk the default schedule of a receiver that never answers 2xx (with a clock of our own)."""
    from datetime import timedelta

    from db.models import DeliveryStatus, WebhookDelivery, utcnow
    from db.settings import Settings
    from worker.webhooks.delivery import Attempt, judge
    from worker.webhooks.sender import Answer

    settings = Settings()
    start = utcnow()
    delivery = WebhookDelivery(event="completed", attempts=0, series_started_at=start, series_first_attempt=1)
    failing = Attempt(at=start, duration_seconds=0.1, answer=Answer(500, "", None, None))
    now, waits = start, []
    while True:
        outcome, next_attempt_at, error = judge(delivery, failing, settings, now=now)
        delivery.attempts += 1
        if outcome != DeliveryStatus.PENDING:
            break
        waits.append((next_attempt_at - now).total_seconds())
        now = next_attempt_at

    assert outcome == DeliveryStatus.GAVE_UP and "gave up after retrying for 24 h" in error
    assert now - start == timedelta(hours=24)  # the last attempt is made at the horizon itself
    assert 3.75 <= waits[0] <= 5
    capped = [w for w in waits if w >= 0.75 * settings.webhook_retry_max_delay_seconds]
    growing = waits[: len(waits) - len(capped)]
    assert all(a < b for a, b in itertools.pairwise(growing)), growing
    assert max(waits) <= settings.webhook_retry_max_delay_seconds
    assert 15 <= delivery.attempts <= 30, delivery.attempts

    # 429/503 wait at least what Retry-After asks, and no longer than the longest backoff.
    for asked, expected in [(120.0, 120.0), (10**7, settings.webhook_retry_max_delay_seconds)]:
        delivery = WebhookDelivery(event="completed", attempts=0, series_started_at=start, series_first_attempt=1)
        busy = Attempt(at=start, duration_seconds=0.1, answer=Answer(503, "", None, asked))
        _, next_attempt_at, _ = judge(delivery, busy, settings, now=start)
        assert (next_attempt_at - start).total_seconds() == expected
