"""Leases run on one clock, the database's: a worker whose wall clock is far off keeps its jobs.

Each test starts a ``gpu`` worker under Debian's ``faketime`` (libfaketime), its wall clock shifted by five
leases behind or ahead of everyone else's (the monotonic clock left alone), and runs diagnostic jobs that
last three leases on it. Were lease expiry written from the worker's clock and checked against the
reconciler's, the worker behind would lose every job while alive (requeued, then ``worker_lost``), and the
one ahead would hold leases far longer than ``lease_seconds`` (a dead worker's job would wait that much
longer). The jobs must succeed on their first attempt, never requeued, with every lease sampled while they
run between now and ``lease_seconds`` ahead on the database's clock.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import time
from datetime import datetime

import pytest

from gpujobs.harness.processes import ManagedProcess, Stack
from tests.integration.client import diagnostic, events, wait_for

OFFSET = 15  # seconds: five of the tests' 3 s leases


def _faketime() -> str:
    found = shutil.which("faketime")
    assert found, "Debian's faketime is needed for this test: `make faketime` (apt-get install faketime)"
    return found


def _skewed_worker(services, offset: int) -> tuple[Stack, ManagedProcess]:
    """A gpu worker of the session's deployment whose wall clock runs ``offset`` seconds off."""
    env = {**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    stack = Stack(env, services.root / "logs", label=f"skewed{offset:+d}")
    name = f"skewed{'ahead' if offset > 0 else 'behind'}-{secrets.token_hex(3)}"
    args = [_faketime(), "-f", f"{offset:+d}s", sys.executable, "-m", "tests.integration.skewed_clock"]
    args += ["worker", "--queues", "gpu", "--concurrency", "2", "--name", name]
    before = time.time()
    worker = stack.start(f"worker-{name}", args)
    worker.node = name
    stack.wait_worker_ready(worker)
    after = time.time()
    # faketime is in effect: the worker's wall clock is the shifted one.
    match = re.search(r"skewed_clock: wall clock ([0-9.]+)", worker.log())
    assert match, worker.tail()
    seen = float(match.group(1))
    assert before + offset - 1 <= seen <= after + offset + 1, (seen - before, offset)
    return stack, worker


def _leases_left(job_ids: list[str]) -> tuple[list[float], int]:
    """Seconds the running jobs' leases have left on the database's clock, and how many jobs are unfinished."""
    from sqlalchemy import select, text

    from db.models import Job, JobStatus
    from db.session import session_scope

    with session_scope() as session:
        now: datetime = session.execute(text("SELECT now()")).scalar_one()
        rows = session.execute(select(Job.status, Job.lease_expires_at).where(Job.id.in_(job_ids))).all()
    left = [(expires - now).total_seconds() for status, expires in rows if status == "running" and expires]
    return left, sum(not JobStatus(status).finished for status, _ in rows)


@pytest.mark.parametrize("offset", [-OFFSET, OFFSET], ids=["clock-behind", "clock-ahead"])
def test_a_worker_whose_clock_is_off_by_more_than_a_lease_keeps_its_jobs(client, keys, services, no_gpu_worker, offset):
    from db.settings import get_settings

    if not services.database.is_postgres:
        pytest.skip("SQLite has no server clock: each process that opens the file reads its own host's")
    lease = get_settings().lease_seconds
    assert 3 * lease < OFFSET, "the shift must be several leases"
    admin = keys.admin.secret
    stack, worker = _skewed_worker(services, offset)
    try:
        jobs = [diagnostic(client, admin, steps=6, sleep_seconds=3 * lease) for _ in range(2)]
        ids = [job["id"] for job in jobs]
        samples: list[float] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left, unfinished = _leases_left(ids)
            samples += left
            if not unfinished:
                break
            time.sleep(0.2)
        finished = [wait_for(client, admin, job_id, timeout=30) for job_id in ids]
    finally:
        stack.stop_all()

    for job in finished:
        timeline = events(job["id"])
        kinds = [event["kind"] for event in timeline]
        assert (job["status"], job["attempts"]) == ("succeeded", 1), (job["status"], job["error"], kinds)
        assert "requeued" not in kinds, kinds
        (claimed,) = [event["message"] for event in timeline if event["kind"] == "claimed"]
        assert claimed.startswith(f"claimed by {worker.node}@"), claimed
    assert samples, "no lease was seen while the jobs ran"
    assert all(0 < left <= lease + 0.5 for left in samples), (
        f"leases of {lease:g} s had between {min(samples):.1f} and {max(samples):.1f} s left on the database's clock"
    )
