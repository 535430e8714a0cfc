"""``diagnostic``: its input, output and declaration (admin keys only)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from worker.jobs.spec import Artifact, JobInput, JobType, Queue


class Input(JobInput):
    sleep_seconds: float = Field(0, ge=0, le=600, description="Total time to sleep, spread over the steps.")
    steps: int = Field(1, ge=1, le=1000, description="Progress is reported and cancel checked at each step.")
    fail: bool = Field(False, description="Raise during the run, to test failure paths.")


class Output(BaseModel):
    steps: int
    artifact: Artifact


JOB_TYPE = JobType(
    name="diagnostic",
    summary="Sleeps with progress steps, can fail on request, writes a small artifact (admin keys only).",
    Input=Input,
    Output=Output,
    queue=Queue.GPU,
    run="worker.jobs.diagnostic.run:run",
    deadline_seconds=900,
    admin_only=True,
)
