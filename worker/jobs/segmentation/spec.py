"""``segmentation``: its input, output, model kind and declaration (no torch).

Concurrent jobs in one worker process run as one padded batch (``model.py``); each job keeps its
own progress, cancel and failure (``run.py``).
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from worker.jobs.segmentation.coco import COCO_LABELS
from worker.jobs.spec import Artifact, ImageFile, JobInput, JobType, ModelKind, Queue, SegmentationModel

SEGMENTATION = ModelKind(
    name="segmentation",
    loader="worker.jobs.segmentation.model:load_segmenter",
    demo="worker.jobs.segmentation.demo:build",
    warm="worker.jobs.segmentation.model:warm_segmenter",
    builtin={
        "mask2former-swin-tiny-coco-instance": {
            "kind": "segmentation",
            "source": "facebook/mask2former-swin-tiny-coco-instance",
            "revision": "22c4a2f15dc88149b8b8d9f4d42c54431fbd66f6",  # main since its safetensors (Sep 2023)
            "files": ["config.json", "preprocessor_config.json", "model.safetensors"],
            "default": True,
        },
    },
)


class Input(JobInput):
    image: ImageFile
    threshold: float = Field(0.5, ge=0, le=1, description="Minimum instance score to keep.")
    mask_threshold: float = Field(0.5, ge=0, le=1, description="Mask probability above which a pixel is in.")
    overlap_mask_area_threshold: float = Field(
        0.8, ge=0, le=1, description="Drop an instance when less than this share of its mask is left after overlaps."
    )
    labels: list[str] | None = Field(
        None, min_length=1, max_length=80, description='Keep only these COCO categories (e.g. `["person", "dog"]`).'
    )
    model: SegmentationModel = None

    @field_validator("labels")
    @classmethod
    def _coco_names(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        unknown = [label for label in labels if label not in COCO_LABELS]
        if unknown:
            raise ValueError(f"not COCO categories: {', '.join(map(repr, unknown))}")
        return list(dict.fromkeys(labels))


class RleMask(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE (pycocotools).")


class Instance(BaseModel):
    id: int = Field(description="The instance's pixel value in `instance_map` (1…n).")
    label: str
    label_id: int
    score: float
    bbox: list[float] = Field(description="[x, y, width, height] in pixels, COCO style.")
    area: int = Field(description="Pixels in the mask.")
    mask: RleMask


class Output(BaseModel):
    width: int
    height: int
    instances: list[Instance]
    instance_map: Artifact
    overlay: Artifact


JOB_TYPE = JobType(
    name="segmentation",
    summary="Instance segmentation (Mask2Former, COCO): masks as COCO RLE, boxes, scores, an instance map "
    "and an overlay.",
    Input=Input,
    Output=Output,
    queue=Queue.GPU,
    run="worker.jobs.segmentation.run:run",
    deadline_seconds=600,
    model_kinds=(SEGMENTATION,),
)
