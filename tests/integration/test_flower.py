"""Flower tells the truth (README "Operate", Flower): a job that ends failed is a FAILURE task, one that
ends canceled a REVOKED task, and the periodic maintenance tasks send no task events at all.

Flower builds its task list from the workers' Celery events with ``celery.events.state.State``; this
test does the same, from the session's real workers, after enabling events by remote control as Flower
does (``test_celery_cli`` shows the workers send none before that).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.client import auth, diagnostic, wait_for


@pytest.fixture
def monitor(cluster: Any, gpu_worker: Any) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """Every event on the broker, in a Flower-like ``State``, with the workers' task events on."""
    from celery.events.state import State

    from db.settings import get_settings
    from worker.celery_app import make_celery

    app = make_celery(get_settings())
    state, seen = State(), []
    stop = threading.Event()

    def on_event(event: dict[str, Any]) -> None:
        seen.append(event)
        state.event(event)

    def run() -> None:
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": on_event})
            threading.Thread(target=lambda: stop.wait() or setattr(receiver, "should_stop", True), daemon=True).start()
            receiver.capture(limit=None, timeout=None, wakeup=False)  # checks should_stop every second

    listener = threading.Thread(target=run, daemon=True)
    listener.start()
    time.sleep(1)  # the receiver's queue is bound
    app.control.enable_events()
    time.sleep(1)  # the workers turned their dispatchers on
    try:
        yield state, seen
    finally:
        app.control.disable_events()
        stop.set()
        listener.join(5)


def _task_of(state: Any, job_id: str, timeout: float = 10) -> Any:
    """The run_job task of ``job_id`` once it is in a ready state (as Flower would list it)."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = [t for t in list(state.tasks.values()) if t.name == "gpujobs.run_job" and job_id in (t.args or "")]
        if (tasks and tasks[-1].ready) or time.monotonic() > deadline:
            assert tasks, f"no run_job task event names {job_id}"
            return tasks[-1]
        time.sleep(0.1)


def test_failed_and_canceled_jobs_are_failed_and_revoked_tasks_and_maintenance_sends_no_events(monitor, client, keys):
    state, seen = monitor
    key = keys.admin.secret
    failed = diagnostic(client, key, fail=True)["id"]
    ok = diagnostic(client, key, steps=1)["id"]
    running = diagnostic(client, key, steps=200, sleep_seconds=20)["id"]
    assert wait_for(client, key, failed)["status"] == "failed"
    assert wait_for(client, key, ok)["status"] == "succeeded"
    wait_for(client, key, running, statuses=("running",))
    assert client.post(f"/v1/jobs/{running}/cancel", headers=auth(key)).status_code == 202
    assert wait_for(client, key, running)["status"] == "canceled"

    assert _task_of(state, failed).state == "FAILURE"
    assert "JobFailed" in (_task_of(state, failed).exception or "")
    assert _task_of(state, ok).state == "SUCCESS"
    assert _task_of(state, running).state == "REVOKED"

    # Beat sends a reconcile and a webhook sweep every second here: none of them shows up as a task.
    names = {event.get("name") for event in seen if event["type"] == "task-received"}
    assert names == {"gpujobs.run_job"}, names
    assert {task.name for task in state.tasks.values()} == {"gpujobs.run_job"}
