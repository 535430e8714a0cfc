"""Warm at start (issue 18 item 2, worker/warm.py): a worker with ``GPUJOBS_PRELOAD_MODELS`` and
``GPUJOBS_WARM_SIZES`` loads its models and runs them at each size before it takes a job (a
segmentation model: at each of its padding buckets instead).

A real worker process on the demo models (the CPU here; on a GPU with ``GPUJOBS_TORCH_COMPILE`` these
runs are when the compiled graphs are built). Meanwhile its heartbeat says ``warming``, the admin page
and ``/metrics/cluster`` show it, and a job submitted then waits in the database (the scheduler counts
no slots of a warming worker, and the worker consumes nothing while it warms) and runs there once it
is warm. The compile caches go to the model-cache
volume by default.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sqlalchemy import select

from db.models import Job, WorkerProcess
from db.session import session_scope
from db.settings import Settings
from gpujobs.harness.processes import Stack
from tests.integration.admin_client import logged_in, page
from tests.integration.client import submit, wait_for

SIZES = ["64x64", "64x72", "72x64", "72x72", "80x64", "64x80"]  # the demo UNet: a few seconds in all
STEPS = 30


def _row(name: str) -> WorkerProcess | None:
    with session_scope() as session:
        rows = session.scalars(select(WorkerProcess).where(WorkerProcess.id.like(f"{name}@%"))).all()
        return rows[-1] if rows else None


def _job(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_worker_warms_its_models_before_it_takes_a_job(no_gpu_worker, services, app, client, keys):
    stack = Stack(dict(os.environ), services.root / "logs", label="warm")
    stack.env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # torch writes it into a process that compiled: not an operator's
    stack.env.update(
        GPUJOBS_PRELOAD_MODELS=json.dumps(["demo-sd", "demo-mask2former"]),
        GPUJOBS_WARM_SIZES=json.dumps(SIZES),
        GPUJOBS_WARM_STEPS=str(STEPS),
        GPUJOBS_SEGMENTATION_MAX_BATCH_SIZE="2",
    )
    browser = logged_in(app.test_client(), keys.admin.secret)
    name = "warm-start"
    worker = stack.start_worker("gpu", concurrency=1, name=name, wait=False)
    try:
        deadline = time.monotonic() + 120
        while (row := _row(name)) is None or not row.warming:
            assert worker.alive and time.monotonic() < deadline and "warmed demo-sd" not in worker.log(), worker.tail()
            time.sleep(0.05)

        body = {
            "type": "text_to_image",
            "input": {"prompt": "a red square", "width": 64, "height": 64, "num_inference_steps": 2},
        }
        job_id = submit(client, keys.admin.secret, body).get_json()["id"]
        workers = page(browser, "/admin/workers")
        metrics = app.test_client().get("/metrics/cluster").get_data(as_text=True)
        still_warming = _row(name)
        job = _job(job_id)
        assert still_warming is not None and still_warming.warming, "the warm-up ended before the checks: more SIZES"
        # No slots while warming: the scheduler sends only its buffer (as with no worker at all), and the
        # worker takes nothing from the broker until it is warm.
        assert job.status == "queued" and job.attempts == 0, "a warming worker runs nothing"
        assert "status-warming" in workers and "gpujobs_workers_warming 1.0" in metrics

        done = wait_for(client, keys.admin.secret, job_id, timeout=120)
        assert done["status"] == "succeeded", done
        log = worker.log()
        assert f"warmed demo-sd ({', '.join(SIZES)})" in log
        # A segmentation model runs each of its buckets (not the warm sizes) at batch 1 and the full batch.
        buckets = ["384x224", "224x384", "384x288", "288x384", "384x384"]
        warmed = ", ".join(f"{bucket} batch {size}" for bucket in buckets for size in (1, 2))
        assert f"warmed demo-mask2former ({warmed})" in log
        assert log.index("warmed demo-sd") < log.index(job_id), "the job ran after the warm-up"
        row = _row(name)
        assert row is not None and not row.warming and row.slots == 1

        settings = Settings()
        cache = (settings.model_dir or settings.var_dir / "models") / "torch-compile"
        assert Path(cache).is_dir(), "the compile cache defaults to the model-cache volume"
    finally:
        worker.kill()
