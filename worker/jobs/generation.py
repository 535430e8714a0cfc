"""The fields that the Stable Diffusion job types share, with their bounds and defaults.

``text_to_image``, ``inpainting`` and ``style_transfer`` build their ``Input`` from these, so a
field means the same in every type (as a keyword does in every diffusers pipeline). Bounds an
operator configures (image size, steps, prompt length; see ``db.settings``) are checked when the
input is validated, so a request over them is a 422 at submit, not a failed job. No torch here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, ValidationInfo

from db.settings import get_settings
from worker.jobs.base import Artifact, JobInput, ModelId

# The samplers a job may name (worker/models/diffusion.py maps each to a diffusers scheduler).
SCHEDULERS = ("euler", "euler_a", "heun", "lms", "ddim", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "unipc")
SchedulerName = Literal["euler", "euler_a", "heun", "lms", "ddim", "pndm", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
DEFAULT_SCHEDULER = "euler"
MAX_SEED = 2**32 - 1
MAX_OUTPUTS = 4
MAX_LORAS = 4
DEADLINE_SECONDS = 900


def _prompt_length(value: str) -> str:
    limit = get_settings().generation_max_prompt_chars
    if len(value) > limit:
        raise ValueError(f"must be at most {limit} characters (it has {len(value)})")
    return value


def _steps_bound(value: int) -> int:
    limit = get_settings().generation_max_steps
    if value > limit:
        raise ValueError(f"must be at most {limit} on this service")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _side(value: int | None, info: ValidationInfo) -> int | None:
    if value is None:
        return None
    settings = get_settings()
    limit = settings.generation_max_width if info.field_name == "width" else settings.generation_max_height
    if value > limit:
        raise ValueError(f"must be at most {limit} on this service")
    return value


Prompt = Annotated[
    str,
    Field(min_length=1, description="What to draw (CLIP reads the first 77 tokens)."),
    AfterValidator(_not_blank),
    AfterValidator(_prompt_length),
]
OptionalPrompt = Annotated[str, Field(description="Text guidance (may be empty)."), AfterValidator(_prompt_length)]
NegativePrompt = Annotated[
    str, Field(description="What to steer away from (may be empty)."), AfterValidator(_prompt_length)
]
Side = Annotated[
    int,
    Field(ge=8, multiple_of=8, description="Pixels, a multiple of 8, at most `GPUJOBS_GENERATION_MAX_WIDTH`/`_HEIGHT`."),
    AfterValidator(_side),
]
Steps = Annotated[
    int,
    Field(ge=1, le=150, description="Denoising steps (image-to-image runs `strength` × this many)."),
    AfterValidator(_steps_bound),
]
GuidanceScale = Annotated[
    float, Field(ge=0, le=30, description="Classifier-free guidance: how strongly to follow the prompt (≤ 1: off).")
]
Scheduler = Annotated[SchedulerName, Field(description="The sampler.")]
Seed = Annotated[
    int | None,
    Field(ge=0, le=MAX_SEED, description="Image i uses seed + i; drawn at random when absent (and returned)."),
]
NumOutputs = Annotated[int, Field(ge=1, le=MAX_OUTPUTS, description="Images made in one batch.")]
Strength = Annotated[float, Field(ge=0, le=1, description="How far to denoise from the input (1: all the way).")]


class LoraRef(JobInput):
    model: ModelId
    scale: float = Field(1.0, ge=-2, le=2, description="How strongly the LoRA applies (0: not at all, 1: as trained).")


def _distinct_models(value: list[LoraRef]) -> list[LoraRef]:
    ids = [ref.model for ref in value]
    if len(set(ids)) != len(ids):
        raise ValueError("names the same model twice; give each LoRA once, with its scale")
    return value


Loras = Annotated[
    list[LoraRef],
    Field(
        max_length=MAX_LORAS,
        description="Fine-tuned LoRA models of this tenant (`finetune` jobs) over the job's base model, "
        "each with its scale; applied for this job only.",
    ),
    AfterValidator(_distinct_models),
]


def check_pixels(width: int | None, height: int | None) -> None:
    """Raise (as a validation error of ``height``) when width × height is over the configured limit."""
    if width is None or height is None:
        return
    limit = get_settings().generation_max_pixels
    if width * height > limit:
        raise ValueError(f"{width}×{height} = {width * height} pixels is more than the limit of {limit} pixels")


class Output(BaseModel):
    images: list[Artifact] = Field(description="PNGs (`image-<i>.png`); each carries its parameters in a text chunk.")
    seed: int = Field(description="The seed of the first image; image i used `seed + i`.")
    seeds: list[int] = Field(description="The seed of each image.")
