"""The job types this service runs: one line per type (each type is a package beside this file)."""

from __future__ import annotations

from worker.jobs.diagnostic import spec as diagnostic
from worker.jobs.diffusion import spec as diffusion
from worker.jobs.finetune import spec as finetune
from worker.jobs.segmentation import spec as segmentation
from worker.jobs.spec import JobType

JOB_TYPES: list[JobType] = [
    diagnostic.JOB_TYPE,
    segmentation.JOB_TYPE,
    diffusion.TEXT_TO_IMAGE,
    diffusion.INPAINTING,
    diffusion.STYLE_TRANSFER,
    finetune.JOB_TYPE,
]
