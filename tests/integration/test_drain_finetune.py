"""A draining training worker checkpoints the fine-tune it hands back; the next attempt resumes there.

The fine-tune is given no periodic checkpoint (``checkpoint_every`` above its steps), so the only
checkpoint is the one the hand-back stores: the resumed attempt must start from it, not from zero,
and the loss curve must run on without a gap. The tiny demo SD model of ``test_finetune``.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from gpujobs.harness.processes import Stack
from tests.integration import test_finetune
from tests.integration.client import wait_for
from tests.integration.test_finetune import TRAIN_TIMEOUT, finetune, timeline

users = test_finetune.users
training_images = test_finetune.training_images

STEPS = 200


@pytest.fixture
def train_stack(cluster, services, tmp_path) -> Any:
    from tests.integration.conftest import quiesce

    env = {**os.environ, "GPUJOBS_WORKER_DRAIN_SECONDS": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    stack = Stack(env, tmp_path / "logs", label="drain-ft")
    try:
        yield stack
    finally:
        quiesce()
        for process in [p for p in stack.processes if p.alive]:
            process.kill()


def test_a_handed_back_finetune_checkpoints_first_and_resumes_there(client, users, training_images, train_stack):
    key = users.me.secret
    params = {
        "images": training_images,
        "instance_prompt": "a block",
        "steps": STEPS,
        "resolution": 64,
        "learning_rate": 0.005,
        "seed": 5,
        "checkpoint_every": STEPS + 1,  # no periodic checkpoint: only the hand-back stores one
        "batch_size": 2,
    }
    doomed = train_stack.start_worker("train", concurrency=1, name="drain-ft-doomed")
    job = finetune(client, key, **params)
    running = wait_for(
        client, key, job["id"], "running", timeout=TRAIN_TIMEOUT, until=lambda j: j["progress"].get("step", 0) >= 5
    )
    assert running["progress"]["step"] < STEPS
    rescuer = train_stack.start_worker("train", concurrency=1, name="drain-ft-rescuer")

    sent = time.monotonic()
    os.kill(doomed.pid, signal.SIGTERM)  # GPUJOBS_WORKER_DRAIN_SECONDS=0: hand back at once
    done = wait_for(client, key, job["id"], ("succeeded", "failed"), timeout=TRAIN_TIMEOUT)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done

    (checkpoint,) = timeline(job["id"], "checkpoint")
    assert checkpoint["attempt"] == 1 and 5 <= checkpoint["data"]["step"] < STEPS, checkpoint
    (requeued,) = timeline(job["id"], "requeued")
    assert requeued["data"] == {"handed_back": True} and requeued["at"] >= checkpoint["at"]
    (resumed,) = timeline(job["id"], "resumed")
    assert resumed["attempt"] == 2 and resumed["data"]["step"] == checkpoint["data"]["step"]
    assert done["output"]["resumed_from"] == checkpoint["data"]["step"]
    assert [p["step"] for p in done["output"]["loss"]] == list(range(1, STEPS + 1))
    assert any(f":{rescuer.pid}:" in (e["message"] or "") for e in timeline(job["id"], "claimed"))
    doomed.proc.wait(30)
    print(
        f"\nfine-tune handed back at step {checkpoint['data']['step']} (checkpoint first); "
        f"succeeded on the other worker {time.monotonic() - sent:.1f} s after the SIGTERM"
    )
