"""``inpainting``: repaint the white part of a mask (``worker.models.diffusion_jobs``).

Sizes: the output is the image's size rounded to a multiple of 8 (or ``width`` × ``height`` when
given); image and mask are resized together to it. A mask of another size than the image is
resized to the image when its aspect ratio is the same (within 1%), e.g. a half-resolution mask;
a mask of another shape fails the job with code ``invalid_mask`` (the API does not decode files at
submit, so this is found when the job runs). The mask is grey levels: ≥ 50% is repainted. After
decoding, pixels outside the mask are copied from the (resized) input, so they stay exact.

The catalog's dedicated inpainting UNet (9 channels) is used when the base model names one
(``inpainting = "<name>"``); otherwise the base pipeline inpaints by blending latents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, ValidationInfo, field_validator

from worker.jobs.base import DiffusionModel, ImageFile, JobInput, JobType, Queue
from worker.jobs.generation import (
    DEADLINE_SECONDS,
    DEFAULT_SCHEDULER,
    GuidanceScale,
    Loras,
    NegativePrompt,
    NumOutputs,
    OptionalPrompt,
    Output,
    Scheduler,
    Seed,
    Side,
    Steps,
    Strength,
    check_pixels,
)

if TYPE_CHECKING:
    from worker.context import JobContext


class Input(JobInput):
    image: ImageFile
    mask: ImageFile
    prompt: OptionalPrompt = ""
    negative_prompt: NegativePrompt = ""
    width: Side | None = Field(None, description="Output width (default: the image's, rounded to 8).")
    height: Side | None = Field(
        None, validate_default=True, description="Output height (default: the image's, rounded to 8)."
    )
    strength: Strength = 1.0
    num_inference_steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    scheduler: Scheduler = DEFAULT_SCHEDULER
    seed: Seed = None
    num_outputs: NumOutputs = 1
    loras: Loras = Field(default_factory=list)
    model: DiffusionModel = None

    @field_validator("height")
    @classmethod
    def _pixels(cls, height: int | None, info: ValidationInfo) -> int | None:
        if "width" in info.data and (height is None) != (info.data["width"] is None):
            raise ValueError("give both width and height, or neither (then the image's size is used)")
        check_pixels(info.data.get("width"), height)
        return height


def run(ctx: JobContext, params: Input) -> Output:
    from worker.models.diffusion_jobs import inpaint

    return inpaint(ctx, params)


JOB_TYPE = JobType(
    name="inpainting",
    summary="Stable Diffusion inpainting: repaint the white part of a mask; the rest of the image is kept.",
    Input=Input,
    Output=Output,
    queue=Queue.GPU,
    run=run,
    deadline_seconds=DEADLINE_SECONDS,
)
