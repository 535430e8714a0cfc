"""`gpujobs up` supervises everything it starts: its embedded Redis and S3 servers, the API, the worker and beat.

One `gpujobs up` (all embedded, small timings) serves the module; each test SIGKILLs one of its processes, as a crash
or the OOM killer would, and checks that `up` starts it again (same ports, same data) while the others carry on, and
that jobs queued, running or submitted across the gap all succeed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from gpujobs.harness.ports import free_port
from tests.integration.up_process import launch_up

ADMIN_KEY = "gpj_test-up-supervision-admin-key-0123"
QUICK = {  # leases expire, reconciles run and lost messages are sent again within a second or two
    "GPUJOBS_LEASE_SECONDS": "3",
    "GPUJOBS_CONTROL_POLL_SECONDS": "0.2",
    "GPUJOBS_RECONCILE_INTERVAL_SECONDS": "1",
    "GPUJOBS_LOST_MESSAGE_SECONDS": "2",
    "OMP_WAIT_POLICY": "PASSIVE",
}


@dataclass
class Up:
    process: subprocess.Popen
    var: Path
    log_path: Path
    url: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float, after: int = 0) -> None:
        """Until ``needle`` appears in the log past its first ``after`` characters."""
        deadline = time.monotonic() + timeout
        while needle not in self.log()[after:]:
            assert self.process.poll() is None, f"gpujobs up exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {needle!r} within {timeout:g} s:\n{self.log()[-4000:]}"
            time.sleep(0.2)

    def leader(self, needle: str) -> int:
        """The pid of the one process-group leader of this `up` whose command line contains ``needle``."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (entry / "environ").read_bytes()
                pgid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
                cwd = os.readlink(entry / "cwd")
            except (OSError, IndexError, ValueError):
                continue
            # redis-server rewrites its command line and environment (its process title); it runs in var/redis.
            mine = cwd.startswith(str(self.var)) or str(self.var) in cmdline or str(self.var).encode() in environ
            if mine and needle in cmdline and pgid == int(entry.name) and int(entry.name) != self.process.pid:
                found.append(int(entry.name))
        assert len(found) == 1, f"processes matching {needle!r}: {found}"
        return found[0]

    # --- the API ---

    def submit(self, steps: int = 2, sleep_seconds: float = 0.5) -> str:
        response = requests.post(
            f"{self.url}/v1/jobs",
            json={"type": "diagnostic", "input": {"steps": steps, "sleep_seconds": sleep_seconds}},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=30,
        )
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict:
        response = requests.get(
            f"{self.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_succeeded(self, job_ids: list[str], timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = [self.job(job_id) for job_id in job_ids]
            finished = [job for job in jobs if job["status"] in ("succeeded", "failed", "canceled")]
            assert all(job["status"] == "succeeded" for job in finished), (finished, self.log()[-3000:])
            if len(finished) == len(jobs):
                return jobs
            assert time.monotonic() < deadline, ([(j["id"], j["status"]) for j in jobs], self.log()[-3000:])
            time.sleep(0.3)

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False


def _artifact_intact(job: dict) -> None:
    artifact = job["output"]["artifact"]
    body = requests.get(artifact["url"], timeout=10).content
    assert hashlib.sha256(body).hexdigest() == artifact["sha256"]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, services) -> Iterator[Up]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("up-supervision")
    var, log_path = root / "var", root / "up.log"
    port = free_port()
    process = launch_up(var, port, ADMIN_KEY, log_path, **QUICK)
    running = Up(process, var, log_path, f"http://127.0.0.1:{port}")
    try:
        running.wait_for_log("gpujobs is ready", timeout=180)
        yield running
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    assert process.returncode == 0, running.log()[-4000:]


def test_a_killed_embedded_redis_comes_back_and_queued_running_and_new_jobs_succeed(up):
    running = [up.submit(steps=4, sleep_seconds=4) for _ in range(2)]  # the worker's two threads
    queued = up.submit(steps=2, sleep_seconds=0.5)  # its message waits in Redis
    deadline = time.monotonic() + 30
    while [up.job(job_id)["status"] for job_id in running] != ["running", "running"]:
        assert time.monotonic() < deadline, "the first two jobs did not start"
        time.sleep(0.2)
    assert up.job(queued)["status"] == "queued"

    mark = len(up.log())
    os.kill(up.leader("redis-server"), signal.SIGKILL)
    during = up.submit()  # the API takes it with its broker gone; the reconciler sends it later
    killed_at = time.monotonic()
    up.wait_for_log("the embedded Redis is back", timeout=30, after=mark)
    print(f"embedded Redis back {time.monotonic() - killed_at:.1f} s after its SIGKILL")
    assert "the embedded Redis exited (killed by SIGKILL)" in up.log()[mark:]
    after = up.submit()
    jobs = up.wait_succeeded([*running, queued, during, after], timeout=120)
    _artifact_intact(jobs[-1])
    assert up.process.poll() is None


def test_a_killed_embedded_s3_comes_back_on_its_data_and_jobs_succeed(up):
    before = up.wait_succeeded([up.submit()], timeout=60)[0]
    across = up.submit(steps=10, sleep_seconds=25)  # runs through the outage, stores after it
    deadline = time.monotonic() + 30
    while up.job(across)["status"] != "running":
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.2)

    mark = len(up.log())
    killed_at = time.monotonic()
    os.kill(up.leader("weed"), signal.SIGKILL)
    up.wait_for_log("the embedded S3 server (weed) is back", timeout=60, after=mark)
    back_after = time.monotonic() - killed_at
    print(f"embedded S3 back {back_after:.1f} s after its SIGKILL")
    assert back_after < 20, f"S3 took {back_after:.1f} s to come back: the job that runs across it would store in it"
    after = up.submit()
    jobs = up.wait_succeeded([across, after], timeout=90)
    for job in [before, *jobs]:
        _artifact_intact(job)  # what was stored before the crash is still there
    assert up.process.poll() is None


# How each child shows in its command line (`gpujobs api` becomes gunicorn).
COMMAND_LINES = {"api": "gunicorn", "worker": "gpujobs worker", "beat": "gpujobs beat"}


@pytest.mark.parametrize("child", ["api", "worker", "beat"])
def test_a_killed_child_is_restarted_and_jobs_carry_on(up, child):
    running = up.submit(steps=4, sleep_seconds=4)
    mark = len(up.log())
    pid = up.leader(COMMAND_LINES[child])
    os.killpg(pid, signal.SIGKILL)  # the whole group: gunicorn's workers with their master
    up.wait_for_log(f"restarting {child}", timeout=30, after=mark)
    assert f"{child} exited (killed by SIGKILL)" in up.log()[mark:]
    deadline = time.monotonic() + 60
    while not up.healthy():
        assert time.monotonic() < deadline, "the API did not come back"
        time.sleep(0.2)
    # "restarting" is logged before the child is started again (after a back-off): wait for the new one.
    while True:
        try:
            if up.leader(COMMAND_LINES[child]) != pid:
                break
        except AssertionError:  # not started yet
            pass
        assert time.monotonic() < deadline, f"no new {child} process"
        time.sleep(0.2)
    after = up.submit()
    up.wait_succeeded([running, after], timeout=120)
