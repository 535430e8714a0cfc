"""``diagnostic``: exercises the whole loop without a model (tests, benchmarks, canaries)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from worker.jobs.base import Artifact, JobError, JobInput, JobType, Queue

if TYPE_CHECKING:
    from worker.context import JobContext


class Input(JobInput):
    sleep_seconds: float = Field(0, ge=0, le=600, description="Total time to sleep, spread over the steps.")
    steps: int = Field(1, ge=1, le=1000, description="Progress is reported and cancel checked at each step.")
    fail: bool = Field(False, description="Raise during the run, to test failure paths.")


class Output(BaseModel):
    steps: int
    artifact: Artifact


class DiagnosticFailure(JobError):
    """The failure a client asked for with ``fail: true``."""

    code = "diagnostic_failure"


def run(ctx: JobContext, params: Input) -> Output:
    pause = params.sleep_seconds / params.steps
    for step in range(params.steps):
        ctx.check()
        if pause:
            time.sleep(pause)
        ctx.progress(step + 1, params.steps)
    if params.fail:
        raise DiagnosticFailure("the diagnostic job was asked to fail (`fail: true`)")
    report = {"job_id": ctx.job_id, "attempt": ctx.attempt, "worker": ctx.worker_id, "steps": params.steps}
    artifact = ctx.store("diagnostic.json", json.dumps(report).encode(), "application/json")
    return Output(steps=params.steps, artifact=artifact)


JOB_TYPE = JobType(
    name="diagnostic",
    summary="Sleeps with progress steps, can fail on request, writes a small artifact (admin keys only).",
    Input=Input,
    Output=Output,
    queue=Queue.GPU,
    run=run,
    deadline_seconds=900,
    admin_only=True,
)
