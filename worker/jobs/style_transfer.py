"""``style_transfer``: a content image in the colours and texture statistics of a style image.

Both images are encoded with the VAE; the content latents' per-channel mean and standard
deviation move toward the style latents' by ``style_strength`` (latent AdaIN); image-to-image
then denoises from them at ``strength`` with the optional prompt (``strength`` 0: the AdaIN result
decoded as is). The output has the content image's size rounded to a multiple of 8; the style
image is resized to it.

When the catalog names an IP-Adapter for the base model (``ip_adapter = "<name>"`` on the
diffusion entry), the denoising is also conditioned on the style image through it, at the adapter
scale ``ip_adapter_scale × style_strength`` (``ip_adapter_scale`` from the catalog, default 1.0):
one knob moves both the latent statistics and the image prompt, and ``style_strength`` 0 is no
style at all. Without an adapter, ``style_strength`` moves the statistics only. See
``worker.models.diffusion`` for how the adapter is kept off every other run of the family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

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
    Steps,
    Strength,
)

if TYPE_CHECKING:
    from worker.context import JobContext


class Input(JobInput):
    content_image: ImageFile
    style_image: ImageFile
    prompt: OptionalPrompt = ""
    negative_prompt: NegativePrompt = ""
    style_strength: float = Field(
        0.7,
        ge=0,
        le=1,
        description=(
            "How far the content's latent statistics move toward the style's (0: not at all); with an IP-Adapter "
            "configured for the model, also the adapter's scale (times the catalog's `ip_adapter_scale`)."
        ),
    )
    strength: Strength = 0.6
    num_inference_steps: Steps = 25
    guidance_scale: GuidanceScale = 7.5
    scheduler: Scheduler = DEFAULT_SCHEDULER
    seed: Seed = None
    num_outputs: NumOutputs = 1
    loras: Loras = Field(default_factory=list)
    model: DiffusionModel = None


def run(ctx: JobContext, params: Input) -> Output:
    from worker.models.diffusion_jobs import style_transfer

    return style_transfer(ctx, params)


JOB_TYPE = JobType(
    name="style_transfer",
    summary="Style transfer with Stable Diffusion: latent statistics of the style image, then image-to-image.",
    Input=Input,
    Output=Output,
    queue=Queue.GPU,
    run=run,
    deadline_seconds=DEADLINE_SECONDS,
)
