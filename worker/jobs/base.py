"""What every job type declares: its input, output, queue, deadline and ``run``.

Nothing here imports torch: the API imports these specs to validate requests and
to build the OpenAPI document. Heavy imports happen inside each type's ``run``.
"""

from __future__ import annotations

import enum
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from worker.context import JobContext


class Queue(str, enum.Enum):
    """Queues by resource class, so capacity scales by adding workers, not code."""

    GPU = "gpu"
    TRAIN = "train"
    WEBHOOKS = "webhooks"
    MAINTENANCE = "maintenance"


class JobError(Exception):
    """A failure the user can act on: becomes the job's ``error`` with this code and message."""

    code = "job_failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


FILE_KIND = "x-gpujobs-file"

ImageFile = Annotated[
    str,
    Field(
        pattern=r"^file_[A-Za-z0-9_-]{1,64}$",
        description="The id of an uploaded image (`POST /v1/files`).",
        json_schema_extra={FILE_KIND: "input"},
    ),
]
DatasetFile = Annotated[
    str,
    Field(
        pattern=r"^file_[A-Za-z0-9_-]{1,64}$",
        description="The id of an uploaded zip (`POST /v1/files` with `purpose=dataset`).",
        json_schema_extra={FILE_KIND: "dataset"},
    ),
]


ModelId = Annotated[
    str,
    Field(
        pattern=r"^mdl_[A-Za-z0-9_-]{1,64}$",
        description="The id of a fine-tuned model of this tenant (`GET /v1/models`).",
    ),
]


CATALOG_KIND = "x-gpujobs-catalog-kind"


SegmentationModel = Annotated[
    str | None,
    Field(
        max_length=200,
        description="A segmentation model of the catalog (default: the catalog's default).",
        json_schema_extra={CATALOG_KIND: "segmentation"},
    ),
]
DiffusionModel = Annotated[
    str | None,
    Field(
        max_length=200,
        description="A diffusion model of the catalog (default: the catalog's default).",
        json_schema_extra={CATALOG_KIND: "diffusion"},
    ),
]


def file_fields(model: type[BaseModel]) -> dict[str, str]:
    """Input fields that hold file ids (or lists of them), with the upload purpose each needs."""
    return _marked_fields(model, FILE_KIND)


def catalog_fields(model: type[BaseModel]) -> dict[str, str]:
    """Input fields that name a catalog model, with the catalog kind each names."""
    return _marked_fields(model, CATALOG_KIND)


def _marked_fields(model: type[BaseModel], marker: str) -> dict[str, str]:
    found = {}
    for name, info in model.model_fields.items():
        annotations = [info]
        for arg in typing.get_args(info.annotation):  # list[ImageFile], ImageFile | None
            annotations += [m for m in getattr(arg, "__metadata__", ())]
            for inner in typing.get_args(arg):
                annotations += [m for m in getattr(inner, "__metadata__", ())]
        for item in annotations:
            extra = getattr(item, "json_schema_extra", None)
            if isinstance(extra, dict) and marker in extra:
                found[name] = str(extra[marker])
    return found


class JobInput(BaseModel):
    """Base of every job type's ``Input``: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Artifact(BaseModel):
    """A stored output file. ``url`` is a presigned GET URL added when the job is read."""

    name: str = Field(description="File name within the job, e.g. `image-0.png`.")
    content_type: str
    size: int = Field(description="Bytes.")
    sha256: str = Field(description="Hex SHA-256 of the stored bytes.")
    url: str | None = Field(None, description="Presigned download URL (expires).")


@dataclass(frozen=True)
class JobType:
    name: str
    summary: str
    Input: type[JobInput]
    Output: type[BaseModel]
    queue: Queue
    run: Callable[[JobContext, Any], BaseModel]
    deadline_seconds: float | None = None  # None: the configured default
    admin_only: bool = False
