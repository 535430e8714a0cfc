"""Fair webhook delivery: one tenant's slow or failing receiver delays no other tenant's webhooks.

Real webhooks workers send to a real receiver in the test process; each test's tenants are new,
and each receiver listens on a port of its own, so every endpoint (tenant, scheme://host:port)
starts with a closed breaker. Timing-sensitive: a serial module.
"""

from __future__ import annotations

import time

from tests.integration import webhook_fixtures
from tests.integration.admin_client import logged_in, page
from tests.integration.client import wait_for
from tests.integration.conftest import make_key
from tests.integration.webhook_fixtures import deliveries, job_with_webhook, parse_time, wait_deliveries
from tests.integration.webhook_receiver import Reply

receiver = webhook_fixtures.receiver
webhooks_worker = webhook_fixtures.webhooks_worker

SLOW_SECONDS = 6.0
SLOW_JOBS = 12  # three rounds of the endpoint's limit of 4: a backlog that outlasts the quick job


def test_claims_take_turns_over_endpoints_hold_the_limit_and_free_an_expired_slot(client, no_gpu_worker):
    """The claim alone, on the session's PostgreSQL (no sender): queued jobs get the deliveries the state
    machine would record when they complete, and a loop of claims shows whom the senders serve."""
    from datetime import timedelta

    from sqlalchemy import delete, update

    from db import endpoints, webhooks
    from db.models import BreakerState, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow
    from db.session import session_scope
    from db.settings import get_settings

    settings = get_settings().model_copy(update={"webhook_endpoint_concurrency": 2})
    busy_key = make_key("busy tenant", "admin")
    busy, quiet = busy_key.secret, make_key("quiet tenant", "admin").secret
    # Addresses nobody listens on: no sender runs here, and the rows are removed at the end.
    busy_jobs = [job_with_webhook(client, busy, f"http://192.0.2.1:9/{i}") for i in range(6)]
    quiet_jobs = [
        job_with_webhook(client, quiet, "http://192.0.2.1:9/q"),
        job_with_webhook(client, quiet, "http://192.0.2.2/"),
    ]
    ids = [job["id"] for job in [*busy_jobs, *quiet_jobs]]
    try:
        with session_scope() as session:
            for job_id in ids:
                webhooks.job_event(session, job_id, WebhookEvent.COMPLETED)

        def claims(count: int) -> list[str | None]:
            """Up to ``count`` claims of this test's deliveries (others, left by earlier tests, are passed over)."""
            taken: list[str | None] = []
            while len(taken) < count:
                with session_scope() as session:
                    delivery = endpoints.claim(session, settings, 60)
                if delivery is None:
                    return [*taken, None]
                if delivery.job_id in ids:
                    taken.append(delivery.job_id)
            return taken

        def owner(job_id: str | None) -> str:
            return "-" if job_id is None else "busy" if job_id in {j["id"] for j in busy_jobs} else "quiet"

        order = [owner(job_id) for job_id in claims(5)]
        # Three endpoints (the busy tenant's, and two of the quiet tenant's) each get a turn before the busy
        # one's second; then the busy endpoint's 2 slots are full, and nothing else is due.
        assert sorted(order[:3]) == ["busy", "quiet", "quiet"] and order[3:] == ["busy", "-"], order

        # A claim that ran out (its sender died) frees its slot.
        busy_endpoint = endpoints.endpoint_id(busy_key.tenant, busy_jobs[0]["webhook"])
        with session_scope() as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.endpoint_id == busy_endpoint, WebhookDelivery.claimed_until.is_not(None))
                .values(claimed_until=utcnow() - timedelta(seconds=1), next_attempt_at=utcnow())
            )
            assert endpoints.in_flight(session, busy_endpoint) == 0
        assert [owner(job_id) for job_id in claims(3)] == ["busy", "busy", "-"]

        # An open breaker defers the endpoint; once its time is up one probe goes (half-open), not two.
        with session_scope() as session:
            session.execute(
                update(WebhookDelivery).where(WebhookDelivery.endpoint_id == busy_endpoint).values(claimed_until=None)
            )
            session.execute(
                update(WebhookEndpoint)
                .where(WebhookEndpoint.id == busy_endpoint)
                .values(state=BreakerState.OPEN.value, open_until=utcnow() + timedelta(seconds=1), trips=1)
            )
        assert claims(1) == [None]
        time.sleep(1.1)
        assert [owner(job_id) for job_id in claims(2)] == ["busy", "-"]
        with session_scope() as session:
            assert session.get(WebhookEndpoint, busy_endpoint).state == BreakerState.HALF_OPEN.value
    finally:
        with session_scope() as session:
            session.execute(delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(ids)))


def test_a_slow_receiver_of_one_tenant_does_not_delay_another_tenants_webhook(
    client, gpu_worker, webhooks_worker, receiver
):
    slow_tenant = make_key("slow receiver tenant", "admin").secret
    quick_tenant = make_key("quick receiver tenant", "admin").secret
    # Two webhooks workers (16 sender threads each): the endpoint's limit of 4 holds across both.
    for _ in range(2):
        webhooks_worker(webhook_timeout_seconds="15", webhook_endpoint_concurrency="4")
    receiver.script("/slow", Reply(delay=SLOW_SECONDS))
    slow_jobs = [job_with_webhook(client, slow_tenant, receiver.url("/slow"), steps=1) for _ in range(SLOW_JOBS)]
    for job in slow_jobs:
        wait_for(client, slow_tenant, job["id"], "succeeded", timeout=60)
    receiver.wait_for("/slow", lambda found: len(found) >= 4, 30)  # the slow endpoint's slots are all taken

    quick = job_with_webhook(client, quick_tenant, receiver.url("/quick"), steps=1)
    done = wait_for(client, quick_tenant, quick["id"], "succeeded", timeout=30)
    [request] = receiver.wait_for("/quick", lambda found: len(found) >= 1, 30)
    delay = request.wall - parse_time(done["finished_at"]).timestamp()
    assert delay <= 5.0, f"the other tenant's webhook came {delay:.2f} s after its job ended"
    assert len(receiver.at("/slow")) < SLOW_JOBS, "the slow tenant's backlog should still be waiting"

    # A delivery waiting for the slow endpoint says why.
    deadline = time.monotonic() + 10
    reasons: list[str] = []
    while not any("in flight (its limit)" in reason for reason in reasons) and time.monotonic() < deadline:
        listed = [d for job in slow_jobs for d in deliveries(client, slow_tenant, job["id"])]
        reasons = [d["deferred"] for d in listed if d["deferred"]]
    assert any("4 attempts to http://127.0.0.1:" in reason for reason in reasons), reasons
    endpoint = listed[0]["endpoint"]
    assert endpoint["origin"] == f"http://127.0.0.1:{receiver.port}" and endpoint["breaker"] == "closed"

    # Every slow delivery arrives in the end, never more than 4 at once at the receiver.
    receiver.wait_for("/slow", lambda found: len(found) >= SLOW_JOBS, SLOW_JOBS / 4 * SLOW_SECONDS + 30)
    for job in slow_jobs:
        wait_deliveries(client, slow_tenant, job["id"], lambda ds: ds and ds[0]["status"] == "delivered", 30)
    assert receiver.most_in_flight["/slow"] == 4, receiver.most_in_flight
    assert len(receiver.at("/slow")) == SLOW_JOBS


def test_the_breaker_opens_after_repeated_failures_defers_then_half_opens_and_closes(
    app, client, gpu_worker, webhooks_worker, receiver
):
    tenant = make_key("failing receiver tenant", "admin").secret
    open_seconds = 3.0
    webhooks_worker(webhook_breaker_failures="3", webhook_breaker_open_seconds=str(open_seconds))
    receiver.script("/down", Reply(500), Reply(500), Reply(500), Reply(503), Reply(200))
    url = receiver.url("/down")
    jobs = [job_with_webhook(client, tenant, url, steps=1) for _ in range(3)]
    got = receiver.wait_for("/down", lambda found: len(found) >= 3, 30)

    # Open: a new delivery to the endpoint waits, untried, and says why.
    later = job_with_webhook(client, tenant, url, steps=1)
    [waiting] = wait_deliveries(client, tenant, later["id"], lambda ds: len(ds) == 1, 30)
    assert waiting["status"] == "pending" and waiting["attempts"] == 0, waiting
    assert waiting["endpoint"]["breaker"] == "open", waiting
    assert waiting["endpoint"]["consecutive_failures"] >= 3
    assert "circuit breaker" in waiting["deferred"] and "open until" in waiting["deferred"], waiting
    assert len(receiver.at("/down")) == 3
    # The dashboard shows it too: among the failing endpoints, and on the job's page.
    browser = logged_in(app.test_client(), tenant)
    overview = page(browser, "/admin/")
    assert waiting["endpoint"]["origin"] in overview and 'class="breaker-open"' in overview
    assert "breaker open" in page(browser, f"/admin/jobs/{later['id']}")

    # Half-open after the open period: one probe (503: open again, twice as long), then one that closes it.
    got = receiver.wait_for("/down", lambda found: len(found) >= 5, 30)
    first_probe, second_probe = got[3], got[4]
    assert first_probe.at - got[2].at >= open_seconds - 0.2, first_probe.at - got[2].at
    assert second_probe.at - first_probe.at >= 2 * open_seconds - 0.2, second_probe.at - first_probe.at

    # Closed: the rest go at once, each delivered; no attempt was spent on the deferred delivery.
    for job in [*jobs, later]:
        wait_deliveries(client, tenant, job["id"], lambda ds: ds and ds[0]["status"] == "delivered", 30)
    [delivered] = deliveries(client, tenant, later["id"])
    assert delivered["endpoint"]["breaker"] == "closed" and delivered["endpoint"]["consecutive_failures"] == 0
    assert delivered["deferred"] is None
    # Deferred, it spent no attempt: one answer, or two if it was the first probe.
    assert [a["status_code"] for a in delivered["history"]] in ([200], [503, 200]), delivered["history"]
    # Four deliveries: three failures, the failed probe, and one success each.
    assert len(receiver.at("/down")) == 8, [r.path for r in receiver.at("/down")]
