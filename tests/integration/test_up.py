"""`gpujobs up`: the embedded start a new user runs first, end to end.

Everything embedded (SQLite, Redis, SeaweedFS), a real job through HTTP, then Ctrl-C:
every process it started must be gone.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import requests

from tests.integration.up_process import launch_up

ADMIN_KEY = "gpj_test-up-admin-key-0123456789"


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if text in cmdline or text.encode() in environ:
            found.append(f"{entry.name}: {cmdline[:120]}")
    return found


def test_up_runs_a_job_and_ctrl_c_leaves_nothing_running(tmp_path, services):
    from gpujobs.harness.ports import free_port

    var = tmp_path / "var"
    port = free_port()
    up = launch_up(var, port, ADMIN_KEY, tmp_path / "up.log")
    try:
        deadline = time.monotonic() + 120
        while "gpujobs is ready" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.3)
        output = (tmp_path / "up.log").read_text()
        assert f"http://127.0.0.1:{port}" in output and ADMIN_KEY in output
        assert (var / "gpujobs.db").exists(), "the embedded default is SQLite under var/"

        headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Prefer": "wait=30"}
        answer = requests.post(
            f"http://127.0.0.1:{port}/v1/jobs", json={"type": "diagnostic", "input": {"steps": 2}}, headers=headers
        )
        assert answer.status_code == 202, answer.text
        job = answer.json()
        assert job["status"] == "succeeded", job
        artifact = job["output"]["artifact"]
        body = requests.get(artifact["url"], timeout=10).content
        assert hashlib.sha256(body).hexdigest() == artifact["sha256"]

        # A job that cannot finish within up's drain window when Ctrl-C comes: handed back to the queue.
        auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        long = requests.post(
            f"http://127.0.0.1:{port}/v1/jobs",
            json={"type": "diagnostic", "input": {"steps": 120, "sleep_seconds": 60}},
            headers=auth,
        ).json()
        deadline = time.monotonic() + 30
        while requests.get(f"http://127.0.0.1:{port}/v1/jobs/{long['id']}", headers=auth).json()["status"] != "running":
            assert time.monotonic() < deadline, "the long job did not start"
            time.sleep(0.2)
    finally:
        interrupted = time.monotonic()
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    stopped_after = time.monotonic() - interrupted
    assert up.returncode == 0, (tmp_path / "up.log").read_text()
    assert "stopped" in (tmp_path / "up.log").read_text()
    assert "did not stop in time" not in (tmp_path / "up.log").read_text(), "a child was killed"
    assert stopped_after < 20, f"up took {stopped_after:.1f} s to stop"
    from db.models import Job
    from db.session import session_scope

    with session_scope(f"sqlite:///{var / 'gpujobs.db'}") as session:
        handed_back = session.get(Job, long["id"])
        assert handed_back is not None and handed_back.status == "queued", handed_back and handed_back.status
    time.sleep(0.5)
    assert processes_mentioning(str(var)) == [], "processes left running after Ctrl-C"
