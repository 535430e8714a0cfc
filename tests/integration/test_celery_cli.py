"""Celery's own command line reaches the workers through ``worker.main`` (README: Flower beside it)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

from tests.integration.client import diagnostic, wait_for
from tests.integration.conftest import ROOT


def test_celery_inspect_through_worker_main_sees_the_running_workers(cluster, gpu_worker):
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.main", "inspect", "ping", "--timeout", "5"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "session-maintenance@" in result.stdout and "pong" in result.stdout, result.stdout


def _task_events(app: Any, seen: list[dict[str, Any]], stop: threading.Event) -> threading.Thread:
    """Collect every event on the broker into ``seen`` until ``stop`` is set (in a thread, as Flower does)."""

    def run() -> None:
        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": seen.append})
            threading.Thread(target=lambda: stop.wait() or setattr(receiver, "should_stop", True), daemon=True).start()
            receiver.capture(limit=None, timeout=None, wakeup=False)  # checks should_stop every second

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_workers_send_task_events_only_once_a_monitor_enables_them(cluster, gpu_worker, client, keys):
    # GPUJOBS_WORKER_TASK_EVENTS is off by default: a job costs no event writes on the broker. Flower
    # sends `enable_events` to every worker every few seconds; from then on the worker sends them.
    from db.settings import get_settings
    from worker.celery_app import make_celery

    app = make_celery(get_settings())
    seen: list[dict[str, Any]] = []
    stop = threading.Event()
    listener = _task_events(app, seen, stop)
    try:
        time.sleep(1)  # the receiver's queue is bound
        quiet = diagnostic(client, keys.admin.secret, steps=1)["id"]
        assert wait_for(client, keys.admin.secret, quiet)["status"] == "succeeded"
        time.sleep(1)
        assert not [e for e in seen if e["type"].startswith("task-")], seen

        app.control.enable_events()  # what Flower does
        time.sleep(1)
        watched = diagnostic(client, keys.admin.secret, steps=1)["id"]
        assert wait_for(client, keys.admin.secret, watched)["status"] == "succeeded"
        deadline = time.monotonic() + 30  # the event follows the job's end; a loaded machine delays it
        while time.monotonic() < deadline and "task-succeeded" not in {e["type"] for e in seen}:
            time.sleep(0.1)
        types = {e["type"] for e in seen}
        assert {"task-received", "task-succeeded"} <= types, types
    finally:
        app.control.disable_events()  # the session's workers go back to the default
        stop.set()
        listener.join(5)
