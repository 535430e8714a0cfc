"""``finetune``: train a LoRA on a diffusion base model; the result is a model generation jobs accept.

The training set is a list of image file ids (with optional ``captions`` of the same length) or
a dataset zip (``training_data.py``); ``instance_prompt`` stands in for a missing caption
(no caption and no instance prompt: the image is learnt with an empty prompt). Images are resized
so their short side is ``resolution`` and centre-cropped to a square.

Runs on the ``train`` queue, so long jobs never hold an inference worker. Every
``checkpoint_every`` steps the LoRA weights, the optimizer state, the step, the loss curve and the
random generator's state are stored under the job; a run that was requeued after its worker died
resumes from the latest checkpoint (its ``resumed`` event says from which step). A cancel stops at
the next step; the last checkpoint stays listed in the job's events. The job body is ``run.py``,
the training loop ``trainer.py``, the training set's checks ``training_data.py``.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, model_validator

from db.settings import get_settings
from worker.jobs.diffusion.spec import DIFFUSION, MAX_SEED
from worker.jobs.spec import Artifact, DatasetFile, DiffusionModel, ImageFile, JobInput, JobType, Queue

MAX_STEPS = 20_000
DEADLINE_SECONDS = 48 * 3600
Caption = Annotated[str, Field(max_length=2000)]


def _image_count(value: list[str] | None) -> list[str] | None:
    limit = get_settings().finetune_max_images
    if value is not None and len(value) > limit:
        raise ValueError(f"must list at most {limit} images on this service (it lists {len(value)})")
    return value


def _resolution_bound(value: int) -> int:
    limit = get_settings().finetune_max_resolution
    if value > limit:
        raise ValueError(f"must be at most {limit} on this service")
    return value


class Input(JobInput):
    images: Annotated[
        list[ImageFile] | None,
        Field(
            min_length=1,
            max_length=100_000,
            description="Training images (file ids, https:// URLs or data: URIs); or give `dataset` (a file id).",
        ),
        AfterValidator(_image_count),
    ] = None
    captions: list[Caption] | None = Field(
        None, description="One caption per image, in the same order (empty: use `instance_prompt`)."
    )
    dataset: DatasetFile | None = Field(
        None, description="A zip of images with optional same-name `.txt` captions; or give `images`."
    )
    instance_prompt: str = Field(
        "", max_length=2000, description="The caption of every image that has none (e.g. `a photo of sks dog`)."
    )
    name: str | None = Field(
        None, min_length=1, max_length=200, description="The fine-tuned model's name (default: from the job)."
    )
    base_model: DiffusionModel = None
    steps: int = Field(500, ge=1, le=MAX_STEPS, description="Optimizer steps.")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate (constant).")
    rank: int = Field(4, ge=1, le=128, description="LoRA rank of the UNet's attention projections.")
    alpha: float | None = Field(None, gt=0, le=1024, description="LoRA alpha (default: `rank`, a scale of 1).")
    resolution: Annotated[
        int,
        Field(ge=64, multiple_of=8, description="Training size in pixels (square crops)."),
        AfterValidator(_resolution_bound),
    ] = 512
    batch_size: int = Field(1, ge=1, le=64, description="Images per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=64, description="Micro-batches per optimizer step.")
    seed: int = Field(
        default_factory=lambda: secrets.randbelow(MAX_SEED + 1),
        ge=0,
        le=MAX_SEED,
        description="Makes the run reproducible; drawn at submit when absent (and kept in the job's input).",
    )
    checkpoint_every: int = Field(
        100, ge=1, le=MAX_STEPS, description="Steps between checkpoints (a requeued run resumes from the last)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> Input:
        if (self.images is None) == (self.dataset is None):
            raise ValueError("give either `images` (file ids) or `dataset` (a zip file id), not both or neither")
        if self.captions is not None:
            if self.images is None:
                raise ValueError("`captions` go with `images`; a dataset zip carries its own .txt captions")
            if len(self.captions) != len(self.images):
                raise ValueError(f"`captions` has {len(self.captions)} entries but `images` has {len(self.images)}")
        return self


class LossPoint(BaseModel):
    step: int
    loss: float = Field(description="Mean training loss of the steps since the previous point.")


class Output(BaseModel):
    model: dict[str, Any] = Field(description="The fine-tuned `Model`, as `GET /v1/models/{id}` shows it.")
    weights: Artifact = Field(description="The LoRA as a diffusers `load_lora_weights` `.safetensors` file.")
    loss: list[LossPoint] = Field(description="The loss curve (at most about 1,000 points).")
    steps: int
    seed: int = Field(description="The seed used (drawn when the input had none).")
    images: int = Field(description="Training images.")
    resumed_from: int | None = Field(description="The checkpoint step this run continued from, if it resumed.")


JOB_TYPE = JobType(
    name="finetune",
    summary="LoRA fine-tuning of a Stable Diffusion model; checkpoints, resumes, and ends as a usable model.",
    Input=Input,
    Output=Output,
    queue=Queue.TRAIN,
    run="worker.jobs.finetune.run:run",
    deadline_seconds=DEADLINE_SECONDS,
    model_kinds=(DIFFUSION,),
)
