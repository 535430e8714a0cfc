"""``text_to_image``: Stable Diffusion from a prompt (``worker.models.diffusion_jobs``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, ValidationInfo, field_validator

from worker.jobs.base import DiffusionModel, JobInput, JobType, Queue
from worker.jobs.generation import (
    DEADLINE_SECONDS,
    DEFAULT_SCHEDULER,
    GuidanceScale,
    Loras,
    NegativePrompt,
    NumOutputs,
    Output,
    Prompt,
    Scheduler,
    Seed,
    Side,
    Steps,
    check_pixels,
)

if TYPE_CHECKING:
    from worker.context import JobContext


class Input(JobInput):
    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    width: Side = Field(512, validate_default=True)
    height: Side = Field(512, validate_default=True)
    num_inference_steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    scheduler: Scheduler = DEFAULT_SCHEDULER
    seed: Seed = None
    num_outputs: NumOutputs = 1
    loras: Loras = Field(default_factory=list)
    model: DiffusionModel = None

    @field_validator("height")
    @classmethod
    def _pixels(cls, height: int, info: ValidationInfo) -> int:
        check_pixels(info.data.get("width"), height)
        return height


def run(ctx: JobContext, params: Input) -> Output:
    from worker.models.diffusion_jobs import text_to_image

    return text_to_image(ctx, params)


JOB_TYPE = JobType(
    name="text_to_image",
    summary="Stable Diffusion text-to-image: 1–4 PNGs from a prompt, reproducible by seed.",
    Input=Input,
    Output=Output,
    queue=Queue.GPU,
    run=run,
    deadline_seconds=DEADLINE_SECONDS,
)
