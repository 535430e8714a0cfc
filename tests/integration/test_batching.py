"""Cross-request batching of text-to-image jobs (issue 18 item 1, worker/jobs/diffusion/batching.py).

A real worker with four slots on the demo model. A long job holds the model; three jobs that can share
a call (same size, steps, sampler, guidance; their own prompts, seeds and image counts) wait for it and
then run as one pipeline call: each job's timeline says so, and each image is the one the job makes
alone, pixel for pixel (the CPU). A job canceled in the middle of a shared call leaves it at a step
and ends canceled while the others run on to their own images. A job that cannot share (another
size) runs in its own call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.integration.client import auth, events, submit, wait_for
from tests.integration.generation import JOB_TIMEOUT, pixels_of, run_job

SHARED = {"width": 64, "height": 64, "num_inference_steps": 6, "guidance_scale": 7.5, "scheduler": "euler_a"}
JOBS = [
    {"prompt": "a red square", "seed": 11, "num_outputs": 1},
    {"prompt": "a blue circle", "negative_prompt": "green", "seed": 22, "num_outputs": 2},
    {"prompt": "a yellow star", "seed": 33, "num_outputs": 1},
]
BLOCKER = {"prompt": "hold the model", "width": 128, "height": 128, "num_inference_steps": 60, "seed": 1}


def _submit(client: Any, key: str, params: dict[str, Any]) -> str:
    response = submit(client, key, {"type": "text_to_image", "input": params})
    assert response.status_code == 202, response.get_data(as_text=True)
    return str(response.get_json()["id"])


def _shared_with(job_id: str) -> int | None:
    decoding = [e for e in events(job_id) if e["kind"] == "progress" and e["message"] == "decoding"]
    return decoding[-1]["data"].get("shared_with") if decoding else None


def _hold_the_model(client: Any, key: str) -> str:
    """A long job that is denoising by the time this returns: the next jobs wait for the model."""
    blocker = _submit(client, key, BLOCKER)
    wait_for(client, key, blocker, "running", timeout=60, until=lambda j: j["progress"].get("step", 0) >= 1)
    return blocker


def test_waiting_jobs_share_one_call_and_each_gets_its_image_alone(no_gpu_worker, start_worker, client, keys):
    key = keys.admin.secret
    start_worker("gpu", concurrency=4)
    alone = [pixels_of(run_job(client, key, "text_to_image", **SHARED, **job)) for job in JOBS]

    blocker = _hold_the_model(client, key)
    together = [_submit(client, key, {**SHARED, **job}) for job in JOBS]
    other_size = _submit(client, key, {**SHARED, **JOBS[0], "width": 72})
    done = {job_id: wait_for(client, key, job_id, timeout=JOB_TIMEOUT) for job_id in [blocker, *together, other_size]}
    assert all(job["status"] == "succeeded" for job in done.values()), done

    assert [_shared_with(job_id) for job_id in together] == [2, 2, 2], "the three waited and shared one call"
    assert _shared_with(other_size) == 0 and _shared_with(blocker) == 0
    for job_id, expected in zip(together, alone, strict=True):
        images = pixels_of(done[job_id])
        assert len(images) == len(expected)
        for mine, theirs in zip(images, expected, strict=True):
            assert np.array_equal(mine, theirs), "a job's image in a shared call is the image it makes alone"


def test_a_job_canceled_in_a_shared_call_leaves_it_and_the_others_finish_as_alone(
    no_gpu_worker, start_worker, client, keys
):
    key = keys.admin.secret
    start_worker("gpu", concurrency=4)
    long = {**SHARED, "num_inference_steps": 40}
    first, third = JOBS[0], JOBS[2]
    alone = [pixels_of(run_job(client, key, "text_to_image", **long, **job)) for job in (first, third)]

    blocker = _hold_the_model(client, key)
    kept_a, leaving, kept_b = (_submit(client, key, {**long, **job}) for job in JOBS)
    wait_for(client, key, blocker, timeout=JOB_TIMEOUT)
    wait_for(client, key, leaving, "running", timeout=60, until=lambda j: j["progress"].get("step", 0) >= 2)
    assert client.post(f"/v1/jobs/{leaving}/cancel", headers=auth(key)).status_code == 202
    canceled = wait_for(client, key, leaving, timeout=JOB_TIMEOUT)
    assert canceled["status"] == "canceled", canceled
    finished = [wait_for(client, key, job_id, timeout=JOB_TIMEOUT) for job_id in (kept_a, kept_b)]
    assert all(job["status"] == "succeeded" for job in finished), finished

    stopped = [e for e in events(leaving) if e["kind"] == "progress" and e["message"] == "stopping"]
    assert stopped and stopped[-1]["data"]["step"] < long["num_inference_steps"], "it left before the call ended"
    assert [_shared_with(job_id) for job_id in (kept_a, kept_b)] == [2, 2]
    for job, expected in zip(finished, alone, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(pixels_of(job), expected, strict=True))
