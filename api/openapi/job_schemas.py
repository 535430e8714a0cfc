"""The jobs' component schemas: one ``<type>Job`` and one ``<type>JobCreate`` per job type.

A ``Job`` is a ``oneOf`` of the per-type jobs, each with ``type`` a ``const``: a generated client (or a
validator) picks the branch by ``type``, so a ``text_to_image`` job's output parses as
``text_to_imageOutput`` even though the three generation types share one output shape (the issue with
the earlier undiscriminated ``anyOf``, which ``openapi-python-client`` read as the first that fit).
The common fields live once, in ``JobCommon``, which each branch includes through ``allOf``.

Inputs are pydantic's validation schemas (what a client may send). Outputs are pydantic's serialization
schemas with every field required: the worker stores ``Output.model_dump()``, so every field is there.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from api.openapi.schemas import NULLABLE_TIME, TIME, obj, page_of, ref
from worker.jobs.spec import Artifact, JobType

STATUSES = ["queued", "running", "succeeded", "failed", "canceled"]
REF_TEMPLATE = "#/components/schemas/{model}"


class EveryFieldRequired(GenerateJsonSchema):
    """Serialization schemas in which a field with a default is required too: a dump always has it."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        return True


def lifted(model: type[BaseModel], schemas: dict[str, Any], *, output: bool = False) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` moved into ``schemas`` (components), so no reference dangles."""
    if output:
        schema = model.model_json_schema(
            ref_template=REF_TEMPLATE, mode="serialization", schema_generator=EveryFieldRequired
        )
    else:
        schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    return schema


def job_common() -> dict[str, Any]:
    return obj(
        {
            "id": {"type": "string"},
            "status": ref("JobStatus"),
            "metadata": ref("Metadata"),
            "error": {"anyOf": [ref("JobError"), {"type": "null"}], "description": "Why it failed; else null."},
            "progress": ref("Progress"),
            "attempts": {"type": "integer"},
            "priority": {"type": "integer", "minimum": 0, "maximum": 9},
            "created_at": TIME,
            "started_at": NULLABLE_TIME,
            "finished_at": NULLABLE_TIME,
            "metrics": ref("JobMetrics"),
            "webhook": {"type": ["string", "null"]},
            "webhook_events_filter": {"type": "array", "items": ref("WebhookEvent")},
            "outputs_expired_at": {
                **NULLABLE_TIME,
                "description": "When retention deleted the job's stored outputs (`GPUJOBS_ARTIFACT_TTL` after "
                "it finished); their artifacts then have `url` null and `expired` true. Null while they are kept.",
            },
            "retry_of": {
                "type": ["string", "null"],
                "description": "The job this one retries (`POST /v1/jobs/{id}/retry`); null for a submitted job, "
                "or once that job has been purged.",
            },
            "retried_as": {
                "type": "array",
                "items": {"type": "string"},
                "description": "The jobs made by retrying this one, oldest first.",
            },
            "urls": ref("Links"),
        },
        description="The fields every job has; each `<type>Job` adds `type`, `input` and `output`.",
    )


def typed_job(name: str, job_type: JobType) -> dict[str, Any]:
    own = obj(
        {
            "type": {"type": "string", "const": name},
            "input": ref(f"{name}Input"),
            "output": {
                "anyOf": [ref(f"{name}Output"), {"type": "null"}],
                "description": "Once `succeeded`; else null.",
            },
        }
    )
    return {
        "title": f"{name}Job",
        "description": f"A `{name}` job. {job_type.summary}",
        "type": "object",
        "allOf": [ref("JobCommon"), own],
    }


def create_variant(name: str, job_type: JobType, envelope: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/jobs`` for one type: the envelope, with ``input`` that type's input."""
    properties = {**envelope["properties"], "type": {"type": "string", "const": name}, "input": ref(f"{name}Input")}
    # The shared shapes by reference: one `Metadata` and one `WebhookEvent` class in a generated client, not one a type.
    properties["metadata"] = {**ref("Metadata"), "description": properties["metadata"].get("description", "")}
    events = properties["webhook_events_filter"]
    properties["webhook_events_filter"] = {**events, "items": ref("WebhookEvent")}
    required = ["type"]
    if any(field.is_required() for field in job_type.Input.model_fields.values()):
        required.append("input")  # `input` defaults to {}, which an input with required fields refuses
    return {
        **envelope,
        "title": f"{name}JobCreate",
        "description": f"Create a `{name}` job.",
        "properties": properties,
        "required": required,
    }


def components(types: dict[str, JobType], create_body: type[BaseModel]) -> dict[str, Any]:
    """Every job-related component schema; ``create_body`` is the ``POST /v1/jobs`` envelope model."""
    schemas: dict[str, Any] = {
        "Artifact": lifted(Artifact, {}, output=True),
        "Progress": obj(
            {
                "step": {"type": "integer"},
                "total": {"type": ["integer", "null"]},
                "fraction": {"type": "number"},
                "message": {"type": ["string", "null"]},
            }
        ),
        "JobError": obj(
            {"code": {"type": "string"}, "message": {"type": "string", "description": "What to do about it."}}
        ),
        "JobMetrics": obj({"queue_seconds": {"type": ["number", "null"]}, "run_seconds": {"type": ["number", "null"]}}),
        "JobCommon": job_common(),
        "JobStatus": {"type": "string", "enum": STATUSES, "title": "JobStatus"},
        "WebhookEvent": {"type": "string", "enum": ["start", "progress", "completed"], "title": "WebhookEvent"},
        "Metadata": {"type": "object", "title": "Metadata", "description": "The client's data, returned as given."},
    }
    envelope = create_body.model_json_schema(ref_template=REF_TEMPLATE)
    for name, job_type in sorted(types.items()):
        schemas[f"{name}Job"] = typed_job(name, job_type)
        schemas[f"{name}JobCreate"] = create_variant(name, job_type, envelope)
        schema = lifted(job_type.Input, schemas)
        schema["title"] = f"{name} input"
        schema["description"] = job_type.summary + (" Admin keys only." if job_type.admin_only else "")
        schemas[f"{name}Input"] = schema
        schema = lifted(job_type.Output, schemas, output=True)
        schema["title"] = f"{name} output"
        schemas[f"{name}Output"] = schema
    schemas["Job"] = union(types, "Job")
    schemas["JobCreate"] = union(types, "JobCreate")
    schemas["JobList"] = page_of("Job")
    return schemas


def union(types: dict[str, JobType], suffix: str) -> dict[str, Any]:
    """One of the per-type schemas, chosen by ``type``."""
    names = sorted(types)
    return {
        "oneOf": [ref(f"{name}{suffix}") for name in names],
        "discriminator": {
            "propertyName": "type",
            "mapping": {name: f"#/components/schemas/{name}{suffix}" for name in names},
        },
    }
