"""``invert``: an image's colours inverted by a (tiny) model. No torch here: the API imports this."""

from __future__ import annotations

from pydantic import BaseModel, Field

from worker.jobs.spec import Artifact, ImageFile, JobInput, JobType, ModelKind, Queue

INVERTER = ModelKind(
    name="inverter",
    loader="tests.integration.toyjob.model:load_inverter",
    demo="tests.integration.toyjob.demo:build",
)


class Input(JobInput):
    image: ImageFile
    strength: float = Field(1.0, ge=0, le=1, description="1: fully inverted; 0: the image as is.")
    model: str | None = Field(None, max_length=200, description="An inverter model of the catalog.")


class Output(BaseModel):
    width: int
    height: int
    image: Artifact


JOB_TYPE = JobType(
    name="invert",
    summary="Inverts an image's colours with an inverter model (a test of adding a job type).",
    Input=Input,
    Output=Output,
    queue=Queue.GPU,
    run="tests.integration.toyjob.run:run",
    deadline_seconds=60,
    model_kinds=(INVERTER,),
)
