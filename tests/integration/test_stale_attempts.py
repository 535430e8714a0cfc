"""A stale attempt (its worker frozen past its lease, then thawed) changes nothing of the job's newer run.

Two workers, the session's 3 s lease: a diagnostic job's worker is frozen (SIGSTOP) in its last step or
while it retries its upload, the job is requeued and run again on the second worker, and succeeds;
then the first worker is thawed. Its attempt finds it no longer owns the job and stops: the artifact
rows still point to the second attempt's objects, whose bytes match the recorded sha256, and the
job's output, progress and timeline are as the second attempt left them.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

from gpujobs.harness.processes import ManagedProcess, signal_group
from tests.integration import storage_faults
from tests.integration.client import diagnostic, events, get_job, wait_for
from tests.integration.storage_faults import assert_artifacts_match_storage, recorded_artifacts

private_s3 = storage_faults.private_s3
fault_workers = storage_faults.fault_workers

FINISHED = ("succeeded", "failed", "canceled")


def _finished_state(job: dict[str, Any]) -> dict[str, Any]:
    """What a finished job says, without the presigned URLs (signed afresh on every read)."""
    output = {**job["output"], "artifact": {k: v for k, v in job["output"]["artifact"].items() if k != "url"}}
    return {key: job[key] for key in ("status", "attempts", "progress", "finished_at", "error")} | {"output": output}


def _after_the_stale_attempt_wakes(
    client: Any, admin: str, job_id: str, stale: ManagedProcess, read: Callable[[str], bytes]
) -> None:
    """Thaw ``stale`` once the job succeeded on its second attempt; check that the thawed attempt changed nothing."""
    done = wait_for(client, admin, job_id, FINISHED, timeout=60)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    rows = assert_artifacts_match_storage(done, read)
    timeline = events(job_id)
    signal_group(stale.proc, signal.SIGCONT)
    stale.wait_for_log("'lease_lost'", timeout=30)  # its run_job task ended: the attempt is over, however it ended

    after = get_job(client, admin, job_id)
    assert _finished_state(after) == _finished_state(done)
    assert recorded_artifacts(job_id) == rows
    assert_artifacts_match_storage(after, read)
    report = json.loads(read(rows[0]["key"]))
    assert report["attempt"] == 2 and after["output"]["artifact"]["sha256"] == rows[0]["sha256"]
    assert events(job_id) == timeline, "the stale attempt added to the timeline"
    requeued = next(i for i, e in enumerate(timeline) if e["kind"] == "requeued")
    assert all(e["attempt"] == 2 for e in timeline[requeued + 1 :] if e["kind"] != "dispatched"), timeline


def test_a_worker_frozen_in_its_last_step_cannot_overwrite_the_next_attempts_outputs(
    client, keys, services, fault_workers
):
    """The issue's reproduction: before fencing, the thawed attempt 1 overwrote ``diagnostic.json``."""
    admin = keys.admin.secret
    first = fault_workers.start({})
    job = diagnostic(client, admin, steps=4, sleep_seconds=6)
    # Step 3 of 4 is saved: the job sleeps in its last step (1.5 s), then stores its report.
    wait_for(client, admin, job["id"], "running", until=lambda j: j["progress"]["step"] == 3)
    signal_group(first.proc, signal.SIGSTOP)
    fault_workers.start({})  # the lease runs out (3 s), the reconciler requeues the job, this worker runs it

    def read(key: str) -> bytes:
        obj = services.s3.client().get_object(Bucket=services.env["GPUJOBS_S3_BUCKET"], Key=key)
        data: bytes = obj["Body"].read()
        return data

    _after_the_stale_attempt_wakes(client, admin, job["id"], first, read)
    # It checked its lease before it uploaded: nothing of attempt 1 was stored at all.
    listing = services.s3.client().list_objects_v2(
        Bucket=services.env["GPUJOBS_S3_BUCKET"], Prefix=f"jobs/{job['id']}/1/"
    )
    assert listing.get("KeyCount", 0) == 0, listing.get("Contents")


def test_a_worker_frozen_while_it_retries_its_upload_cannot_change_the_winners_artifacts(
    client, keys, private_s3, fault_workers
):
    """S3 is down as attempt 1 stores its report: it spools it and retries; its worker is frozen meanwhile.
    S3 comes back, attempt 2 succeeds on another worker, then attempt 1 is thawed in its upload loop."""
    admin = keys.admin.secret
    first = fault_workers.start(private_s3.env)
    job = diagnostic(client, admin, steps=2, sleep_seconds=2)
    wait_for(client, admin, job["id"], "running")
    private_s3.kill()
    first.wait_for_log(f"job {job['id']}: could not store jobs/{job['id']}/1/diagnostic.json", timeout=30)
    signal_group(first.proc, signal.SIGSTOP)  # in the middle of storing its output
    assert fault_workers.spooled(), "attempt 1's report waits in the spool"
    private_s3.restart()
    fault_workers.start(private_s3.env)

    _after_the_stale_attempt_wakes(client, admin, job["id"], first, private_s3.read)
    assert fault_workers.spooled() == [], "the stale attempt's spool is removed when it stops"
