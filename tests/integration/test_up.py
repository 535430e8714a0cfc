"""`gpujobs up`: the embedded start a new user runs first, end to end.

Everything embedded (SQLite, Redis, SeaweedFS), a real job through HTTP, then Ctrl-C:
every process it started must be gone.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import requests

from gpujobs.harness.processes import gpujobs_command
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
        _check_info(var, port)

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
    gone = _info(var)
    assert gone.returncode == 1 and "no gpujobs up is running" in gone.stderr, gone


def _info(var: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")} | {"GPUJOBS_VAR_DIR": str(var)}
    command = [*gpujobs_command(), "info", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def _check_info(var: Path, port: int) -> None:
    """`gpujobs info` names the running set-up's parts, and `--env` is enough to reach its broker and S3."""
    import redis

    from gpujobs.harness.servers import s3_client

    shown = _info(var)
    assert shown.returncode == 0, shown.stderr
    info = dict(line.split(":", 1) for line in shown.stdout.splitlines())
    info = {name: value.strip() for name, value in info.items()}
    assert info["api"] == f"http://127.0.0.1:{port}"
    assert info["database"] == f"sqlite:///{var.resolve() / 'gpujobs.db'}"
    assert info["admin key file"] == "(configured: GPUJOBS_ADMIN_KEY)"  # launch_up sets it
    assert info["s3 keys file"] == str(var.resolve() / "s3-credentials.json")
    exported = _info(var, "--env")
    assert exported.returncode == 0, exported.stderr
    env = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in exported.stdout.splitlines())
    assert env["GPUJOBS_BROKER_URL"] == info["broker"] and env["GPUJOBS_S3_ENDPOINT_URL"] == info["s3 endpoint"]
    assert redis.Redis.from_url(env["GPUJOBS_BROKER_URL"]).ping()
    s3 = s3_client(env["GPUJOBS_S3_ENDPOINT_URL"], env["GPUJOBS_S3_ACCESS_KEY"], env["GPUJOBS_S3_SECRET_KEY"])
    assert s3.head_bucket(Bucket=env["GPUJOBS_S3_BUCKET"])["ResponseMetadata"]["HTTPStatusCode"] == 200
