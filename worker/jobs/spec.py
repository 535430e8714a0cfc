"""What every job type declares: its input, output, queue, deadline, model kinds and ``run``.

Nothing here imports torch: the API imports these specs to validate requests and to build the
OpenAPI document. ``run`` and a model kind's loader are dotted paths (``module:function``) that
only the worker resolves, so importing a spec never imports model code.
"""

from __future__ import annotations

import enum
import importlib
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Queue(str, enum.Enum):
    """Queues by resource class, so capacity scales by adding workers, not code. The one list of queues."""

    GPU = "gpu"
    TRAIN = "train"
    WEBHOOKS = "webhooks"
    MAINTENANCE = "maintenance"

    @property
    def runs_models(self) -> bool:
        """Whether jobs on this queue hold an accelerator (the dashboard's GPU-time figures count these)."""
        return self in (Queue.GPU, Queue.TRAIN)


class JobError(Exception):
    """A failure the user can act on: becomes the job's ``error`` with this code and message."""

    code = "job_failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


FILE_KIND = "x-gpujobs-file"

FILE_ID_PATTERN = r"^file_[A-Za-z0-9_-]{1,64}$"
# An image field also takes an http(s) URL or a data: URI; the API turns either into a file of the
# tenant at submit (``api.remote_inputs``), so a stored job's input, and what a worker reads, is a file id.
IMAGE_PATTERN = r"^(file_[A-Za-z0-9_-]{1,64}|[Hh][Tt][Tt][Pp][Ss]?://\S+|[Dd][Aa][Tt][Aa]:\S+)$"

_IMAGE = re.compile(IMAGE_PATTERN)


def _image_value(value: str) -> str:
    """The pattern's check, with a message that says what is accepted (pydantic's would quote the regex)."""
    if not _IMAGE.match(value):
        raise ValueError("must be a file id (file_…), an https:// URL or a data: URI (data:image/png;base64,…)")
    return value


ImageFile = Annotated[
    str,
    Field(
        description="An image: the id of an uploaded file (`POST /v1/files`), an `https://` URL (fetched at "
        "submit) or a `data:image/…;base64,…` URI. A URL or data URI becomes a file of the tenant, and the "
        "job's `input` shows that file's id.",
        json_schema_extra={FILE_KIND: "input", "pattern": IMAGE_PATTERN},
    ),
    AfterValidator(_image_value),
]
DatasetFile = Annotated[
    str,
    Field(
        pattern=FILE_ID_PATTERN,
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


@dataclass(frozen=True)
class TenantModelRef:
    """A fine-tuned model of the tenant that an input names, and the base model it must have been made for."""

    loc: tuple[str | int, ...]  # where in the input, for the 422
    model_id: str
    base_model: str | None  # None: the catalog's default of ``base_kind``
    base_kind: str


class JobInput(BaseModel):
    """Base of every job type's ``Input``: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")

    def tenant_model_refs(self) -> list[TenantModelRef]:
        """The tenant's fine-tuned models this input names; the API checks each at submit (else 422)."""
        return []


class Artifact(BaseModel):
    """A stored output file. ``url`` is a presigned GET URL added when the job is read."""

    name: str = Field(description="File name within the job, e.g. `image-0.png`.")
    content_type: str
    size: int = Field(description="Bytes.")
    sha256: str = Field(description="Hex SHA-256 of the stored bytes.")
    url: str | None = Field(
        None, description="Presigned download URL (expires); null once retention deleted the object (`expired`)."
    )
    expired: bool = Field(
        False, description="True once retention deleted the stored object (`GPUJOBS_ARTIFACT_TTL`): no URL any more."
    )


def resolve(path: str) -> Any:
    """The object a ``module:attribute`` path names (imported on first use)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class ModelKind:
    """A kind of model the catalog may name: declared once, with the job types that load it.

    The catalog accepts its ``name`` as a ``kind``; the worker's model cache loads it with ``loader``
    (``module:function(entry, folder, device, dtype)``) under ``cache_key``; ``gpujobs models demo``
    builds a tiny one with ``demo`` (``module:function(directory) -> {name: catalog table}``);
    ``/v1/models`` lists models of the kinds that are ``listed`` (the others are parts of those);
    ``warm`` runs a loaded one at the operator's warm sizes at worker start (``worker.warm``).
    """

    name: str
    loader: str | None  # None: loaded only as a part of another model, by that model's code
    demo: str | None = None
    listed: bool = True
    builtin: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # entries when no catalog is set
    # ``module:function(model, sizes, settings) -> list[str]``: run a loaded model once per warm size
    # (``GPUJOBS_WARM_SIZES``) before the worker takes jobs; returns what it warmed.
    warm: str | None = None

    def cache_key(self, model: str, variant: str | None = None) -> str:
        return f"{self.name}:{model}" + (f"@{variant}" if variant else "")


@dataclass(frozen=True)
class JobType:
    """One job type: what the API validates and lists, and what the worker runs (``run``, resolved lazily)."""

    name: str
    summary: str
    Input: type[JobInput]
    Output: type[BaseModel]
    queue: Queue
    run: str  # ``module:function(ctx, params) -> Output``
    deadline_seconds: float | None = None  # None: the configured default
    admin_only: bool = False
    model_kinds: tuple[ModelKind, ...] = ()

    def runner(self) -> Callable[[Any, Any], BaseModel]:
        return typing.cast(Callable[[Any, Any], BaseModel], resolve(self.run))
