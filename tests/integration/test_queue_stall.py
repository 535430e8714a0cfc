"""No silent stall (issue 14 item 6): a queue with work and no alive worker serving it is flagged.

The session's deployment has a gpu worker and a maintenance worker and nobody on ``webhooks``: a
job with a webhook finishes and its delivery waits. ``/metrics`` must say so
(``gpujobs_queue_stalled{queue="webhooks"} 1``, ``gpujobs_queue_consumers`` for every queue), and so
must ``/readyz`` (still 200) and the dashboard, within one heartbeat period of the delivery falling
due. A webhooks worker that starts clears the stall within one heartbeat period of being ready (its
first heartbeat is written before it takes work) and delivers; stopped gracefully it drops out at once.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration import webhook_fixtures
from tests.integration.admin_client import logged_in, page
from tests.integration.client import wait_for
from tests.integration.webhook_fixtures import deliveries, job_with_webhook

receiver = webhook_fixtures.receiver
webhooks_worker = webhook_fixtures.webhooks_worker

QUEUES = {"gpu", "train", "webhooks", "maintenance"}


def samples(client: Any, name: str) -> dict[str, float]:
    """``{queue: value}`` of one per-queue metric, from a real scrape."""
    response = client.get("/metrics/cluster")
    assert response.status_code == 200
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels["queue"]] = sample.value
    return found


def wait_metric(client: Any, name: str, queue: str, value: float, timeout: float) -> float:
    """Seconds until ``name{queue}`` reads ``value`` (fails after ``timeout``)."""
    started = time.monotonic()
    while True:
        current = samples(client, name).get(queue)
        if current == value:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{name}{{queue={queue!r}}} is {current}, not {value}"
        time.sleep(0.1)


def readyz_once(client: Any, until: Any, timeout: float) -> dict[str, Any]:
    """``/readyz``'s body once ``until(body)`` holds (it caches its checks for a second); always a 200 here."""
    deadline = time.monotonic() + timeout
    while True:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.get_data(as_text=True)  # a stall is no reason to leave the Service
        body: dict[str, Any] = ready.get_json()
        if until(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def test_a_queue_without_a_consumer_is_flagged_within_one_heartbeat(
    client, keys, gpu_worker, webhooks_worker, receiver
):
    from db.settings import get_settings

    settings = get_settings()
    admin = keys.admin.secret
    # A webhooks worker another test killed (SIGKILL) still counts until it has been silent that long.
    wait_metric(client, "gpujobs_queue_consumers", "webhooks", 0, settings.worker_lost_seconds + 10)
    consumers = samples(client, "gpujobs_queue_consumers")
    assert set(consumers) == QUEUES and set(samples(client, "gpujobs_queue_stalled")) == QUEUES
    assert consumers["gpu"] >= 1 and consumers["maintenance"] >= 1, consumers

    job = job_with_webhook(client, admin, receiver.url("/stall"), steps=1)
    wait_for(client, admin, job["id"], "succeeded", timeout=30)
    flagged_after = wait_metric(client, "gpujobs_queue_stalled", "webhooks", 1, settings.heartbeat_seconds)
    print(f"\nwebhooks queue flagged stalled {flagged_after:.2f} s after the job finished")
    assert samples(client, "gpujobs_queue_stalled")["gpu"] == 0

    body = readyz_once(client, lambda b: "webhooks" in b["stalled_queues"], settings.readiness_cache_seconds + 5)
    assert "webhooks" in body["stalled_queues"], body
    assert body["queues"]["webhooks"]["consumers"] == 0 and body["queues"]["webhooks"]["work"] >= 1, body
    assert body["queues"]["webhooks"]["stalled"] is True
    assert body["queues"]["gpu"]["stalled"] is False and body["queues"]["gpu"]["consumers"] >= 1

    logged_in(client, admin)
    overview = page(client, "/admin/")
    assert 'id="stalled-queues"' in overview and 'id="queue-webhooks" class="stalled"' in overview, overview
    assert 'id="queue-gpu" class="stalled"' not in overview
    (delivery,) = deliveries(client, admin, job["id"])
    assert delivery["status"] == "pending" and delivery["attempts"] == 0  # what it used to do in silence

    worker = webhooks_worker()
    cleared_after = wait_metric(client, "gpujobs_queue_stalled", "webhooks", 0, settings.heartbeat_seconds)
    print(f"stall cleared {cleared_after:.2f} s after the webhooks worker was ready")
    receiver.wait_for("/stall", lambda got: len(got) >= 1, 30)
    assert samples(client, "gpujobs_queue_consumers")["webhooks"] == 1

    os.kill(worker.pid, signal.SIGTERM)  # a graceful stop: out of the count at once, not a lost-timeout later
    dropped_after = wait_metric(client, "gpujobs_queue_consumers", "webhooks", 0, settings.heartbeat_seconds)
    print(f"a gracefully stopped worker dropped out {dropped_after:.2f} s after its SIGTERM")
    worker.proc.wait(20)
