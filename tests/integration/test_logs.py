"""Structured logs and ``X-Request-ID`` (README "Operate"): a real `gpujobs api` (gunicorn) and a real
`gpujobs worker`, both with ``GPUJOBS_LOG_FORMAT=json``; their log files are parsed line by line.

One request's id is followed from the access line to the job's submit line, and the job's id and
attempt through the worker's lines. The header's checks (echoed, hostile values replaced, present on
problem+json answers) run through Flask's test client.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gpujobs.harness.processes import ManagedProcess, Stack
from tests.integration.client import auth

FINISHED = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def json_stack(services: Any, cluster: Any) -> Iterator[tuple[Stack, str]]:
    env = {**os.environ, "GPUJOBS_LOG_FORMAT": "json"}
    stack = Stack(env, services.root / "logs", label="json-logs")
    try:
        _, base_url = stack.start_api(workers=1)
        yield stack, base_url
    finally:
        stack.stop_all()


def _lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log as JSON (a line that is not JSON fails the test, naming it).

    Celery's notices from its signal handlers (``worker: Warm shutdown``) are printed, not logged: a
    signal handler must not take the logging lock. The workers are read before they are stopped."""
    parsed = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip() or line.startswith("worker: "):
            continue
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"{path.name} line {number} is not JSON: {line!r}") from None
    return parsed


def _wait(base_url: str, key: str, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{base_url}/v1/jobs/{job_id}", headers=auth(key), timeout=10).json()
        if job["status"] in FINISHED or time.monotonic() > deadline:
            return dict(job)
        time.sleep(0.1)


def _until(read: Any, what: str, timeout: float = 10) -> Any:
    """``read()`` until it returns something truthy (log lines are flushed a moment after the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        found = read()
        if found or time.monotonic() > deadline:
            assert found, what
            return found
        time.sleep(0.1)


def test_one_request_id_and_one_job_id_join_the_api_and_worker_json_logs(json_stack, no_gpu_worker, keys):
    stack, base_url = json_stack
    worker: ManagedProcess = stack.start_worker("gpu", concurrency=1)
    try:
        request_id = f"req-{secrets.token_hex(6)}"
        response = requests.post(
            f"{base_url}/v1/jobs",
            json={"type": "diagnostic", "input": {"steps": 2}},
            headers={**auth(keys.admin.secret), "X-Request-ID": request_id},
            timeout=10,
        )
        assert response.status_code == 202, response.text
        assert response.headers["X-Request-ID"] == request_id
        job_id = response.json()["id"]
        assert _wait(base_url, keys.admin.secret, job_id)["status"] == "succeeded"

        api_log = stack.processes[0].log_path

        def access_line() -> list[dict[str, Any]]:
            return [
                line
                for line in _lines(api_log)
                if line["logger"] == "gunicorn.access" and line.get("request_id") == request_id
            ]

        (access,) = _until(access_line, f"no access line with request id {request_id} in {api_log}")
        assert access["method"] == "POST" and access["path"] == "/v1/jobs" and access["status"] == 202, access
        assert access["role"] == "api" and access["level"] == "info" and access["duration_ms"] >= 0
        assert access["ts"].endswith("Z")
        submitted = [line for line in _lines(api_log) if "submitted" in line["msg"] and line.get("job_id") == job_id]
        assert len(submitted) == 1 and submitted[0]["request_id"] == request_id, submitted
        assert submitted[0]["logger"] == "api.jobs"

        def job_lines() -> list[dict[str, Any]]:
            lines = [line for line in _lines(worker.log_path) if line.get("job_id") == job_id]
            return lines if any(" succeeded" in line["msg"] for line in lines) else []

        lines = _until(job_lines, f"the worker logged no line with job_id {job_id}")
        assert {line["role"] for line in lines} == {"worker"}
        started = [line for line in lines if "started on" in line["msg"]]
        assert len(started) == 1 and started[0]["attempt"] == 1, lines
        assert all(line.get("attempt") == 1 for line in lines if line["logger"].startswith("worker.")), lines
    finally:
        worker.stop()


def test_routine_maintenance_passes_log_at_debug_only(cluster):
    # The session's maintenance worker and beat run the reconcile every second (text format, info level):
    # not one line about it, while jobs' task lines stay at info (test_cancel reads them).
    time.sleep(2.5)
    assert "beat: Starting" in cluster.beat.log()
    assert "Sending due task" not in cluster.beat.log(), cluster.beat.tail()
    (maintenance,) = [p for p in cluster.stack.processes if p.name == "worker-session-maintenance"]
    # Only the routine lines: a pass that fails (another test of this process cuts the database off) still
    # logs its error, as it should.
    routine = re.compile(r"gpujobs\.(reconcile|sweep_webhooks|retention)\[[^\]]*\] (received|succeeded)")
    assert not routine.search(maintenance.log()), maintenance.tail()


def test_request_id_is_echoed_on_every_answer_and_hostile_ones_are_replaced(client, keys):
    given = "client-42.a:b@c/d+e=f_g"
    ok = client.get("/v1/jobs", headers={**auth(keys.admin.secret), "X-Request-ID": given})
    assert ok.status_code == 200 and ok.headers["X-Request-ID"] == given

    # problem+json answers carry it too: 401, 404, 405, 422
    for method, path, headers in (
        ("get", "/v1/jobs", {}),
        ("get", "/v1/jobs/job_nothere", auth(keys.admin.secret)),
        ("delete", "/v1/jobs", auth(keys.admin.secret)),
        ("post", "/v1/jobs", auth(keys.admin.secret)),
    ):
        answer = getattr(client, method)(path, headers={**headers, "X-Request-ID": given})
        assert answer.status_code >= 400 and answer.mimetype == "application/problem+json", answer.status
        assert answer.headers["X-Request-ID"] == given, (method, path)

    # None given: one is made (32 hex digits), a new one each time.
    made = {client.get("/healthz").headers["X-Request-ID"] for _ in range(2)}
    assert len(made) == 2 and all(len(rid) == 32 and int(rid, 16) >= 0 for rid in made)

    for hostile in ("a" * 129, "<script>alert(1)</script>", "id with spaces", 'quote"d', "ünïcode", "", "a\tb"):
        answer = client.get("/healthz", headers={"X-Request-ID": hostile})
        echoed = answer.headers["X-Request-ID"]
        assert echoed != hostile and len(echoed) == 32 and int(echoed, 16) >= 0, (hostile, echoed)
    longest = "b" * 128
    assert client.get("/healthz", headers={"X-Request-ID": longest}).headers["X-Request-ID"] == longest
