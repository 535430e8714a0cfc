"""Fixtures and calls shared by the webhook tests: a receiver, webhooks workers, the deliveries API."""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any

import pytest

from gpujobs.harness.processes import Stack
from tests.integration.client import auth, submit
from tests.integration.webhook_receiver import Receiver

FAST = {
    "GPUJOBS_WEBHOOK_ALLOW_PRIVATE": "true",
    "GPUJOBS_WEBHOOK_RETRY_BASE_SECONDS": "1",
    "GPUJOBS_WEBHOOK_TIMEOUT_SECONDS": "2",
    "GPUJOBS_WEBHOOK_RETRY_HORIZON_SECONDS": "30",
}


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.stop()


@pytest.fixture
def webhooks_worker(cluster, services):
    """Start a worker on the webhooks queue with FAST settings and the test's own; killed at the test's end."""
    started = []

    def start(env: dict[str, str] | None = None, **settings: str):
        """``settings`` are Settings fields (``webhook_timeout_seconds="1"``), ``env`` other variables."""
        settings_env = {f"GPUJOBS_{name.upper()}": value for name, value in settings.items()}
        env = {**os.environ, **FAST, **settings_env, **(env or {})}
        worker = Stack(env, services.root / "logs", label="webhooks").start_worker("webhooks", concurrency=4)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.alive:
            worker.kill()


def job_with_webhook(client, key: str, url: str, events_filter: list[str] | None = None, **params: Any) -> dict:
    body: dict[str, Any] = {"type": "diagnostic", "input": params, "webhook": url}
    if events_filter is not None:
        body["webhook_events_filter"] = events_filter
    response = submit(client, key, body)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def deliveries(client, key: str, job_id: str) -> list[dict]:
    response = client.get(f"/v1/jobs/{job_id}/webhooks?limit=100", headers=auth(key))
    assert response.status_code == 200, response.get_data(as_text=True)
    return list(reversed(response.get_json()["items"]))  # oldest first


def wait_deliveries(client, key: str, job_id: str, until, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    found = deliveries(client, key, job_id)
    while not until(found):
        if time.monotonic() > deadline:
            raise AssertionError(f"the deliveries of {job_id} did not get there in {timeout:g}s: {found}")
        time.sleep(0.1)
        found = deliveries(client, key, job_id)
    return found


def secret_of(client, key: str) -> str:
    response = client.get("/v1/webhooks/secret", headers=auth(key))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["secret"]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def without_urls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_urls(v) for k, v in value.items() if k != "url"}
    if isinstance(value, list):
        return [without_urls(v) for v in value]
    return value
