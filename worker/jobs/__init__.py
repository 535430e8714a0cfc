"""The job-type registry: one module per type; adding a type is one line here."""

from __future__ import annotations

from worker.jobs import diagnostic, finetune, inpainting, segmentation, style_transfer, text_to_image
from worker.jobs.base import JobType

REGISTRY: dict[str, JobType] = {
    module.JOB_TYPE.name: module.JOB_TYPE
    for module in (diagnostic, segmentation, text_to_image, inpainting, style_transfer, finetune)
}


def get_job_type(name: str) -> JobType | None:
    return REGISTRY.get(name)
