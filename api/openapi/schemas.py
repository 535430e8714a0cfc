"""The document's component schemas of resources other than jobs (files, models, keys, webhooks, tenants…).

Every object lists in ``required`` exactly the fields the server always sends (a generated client then types
them as present, not as optional); a field that may be absent is named in ``optional``. Nullable fields are
typed ``[T, "null"]``. ``tests/integration/test_openapi_client.py`` checks real answers against these.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from db.models import EventKind, Role

TIME = {"type": "string", "format": "date-time"}
NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
URLS = {"$ref": "#/components/schemas/Links"}


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Any], optional: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
    """An object schema whose every property is required except those named in ``optional``."""
    left_out = set(optional)
    assert left_out <= set(properties), left_out - set(properties)
    return {
        "type": "object",
        "required": [name for name in properties if name not in left_out],
        "properties": properties,
        **extra,
    }


def page_of(item: str) -> dict[str, Any]:
    return obj(
        {
            "items": {"type": "array", "items": ref(item)},
            "next_cursor": {"type": ["string", "null"], "description": "Pass as `cursor` for the next page."},
        }
    )


def problem() -> dict[str, Any]:
    return obj(
        {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "description": "422: each bad field, `loc` naming where it is (`body`, `input`, the field…).",
                "items": obj(
                    {"loc": {"type": "array", "items": {"type": ["string", "integer"]}}, "msg": {"type": "string"}}
                ),
            },
            "quota": {"type": "string", "description": "429: the quota or limit that refused the request."},
            "limit": {"type": "integer", "description": "429: that quota's value."},
            "used": {"type": "integer", "description": "429: what the tenant or key had used of it."},
        },
        optional=["errors", "quota", "limit", "used"],
        description="An RFC 9457 problem (`application/problem+json`); some answers add fields of their own.",
    )


def file_schema() -> dict[str, Any]:
    return obj(
        {
            "id": {"type": "string"},
            "filename": {"type": "string"},
            "purpose": {"type": "string", "enum": ["input", "dataset"]},
            "content_type": {"type": "string"},
            "size": {"type": "integer", "description": "Bytes."},
            "sha256": {"type": "string"},
            "width": {"type": "integer", "description": "Images only."},
            "height": {"type": "integer", "description": "Images only."},
            "created_at": TIME,
            "urls": URLS,
        },
        optional=["width", "height"],
    )


def model_schemas() -> dict[str, Any]:
    """``Model``: a catalog base model or a fine-tuned LoRA, told apart by ``kind``."""
    common = {
        "id": {"type": "string", "description": "`mdl_…` for a fine-tuned model; the catalog name for a base model."},
        "name": {"type": "string"},
        "urls": URLS,
    }
    return {
        "CatalogModel": obj(
            {
                **common,
                "kind": {"type": "string", "const": "base"},
                "base_model": {"type": "null"},
                "task": {"type": "string", "description": "The catalog kind (`diffusion`, `segmentation`)."},
                "default": {"type": "boolean", "description": "The catalog's default for its kind."},
                "created_at": {"type": "null"},
            },
            title="CatalogModel",
            description="A base model of the service's catalog.",
        ),
        "LoraModel": obj(
            {
                **common,
                "kind": {"type": "string", "const": "lora"},
                "base_model": {"type": "string", "description": "The catalog model the LoRA applies to."},
                "created_at": TIME,
                "job_id": {"type": ["string", "null"], "description": "The `finetune` job that made it."},
                "weights": ref("ModelWeights"),
                "details": {"type": "object", "description": "How it was trained (rank, alpha, steps, resolution…)."},
            },
            title="LoraModel",
            description="A LoRA fine-tuned by this tenant (`finetune`).",
        ),
        "ModelWeights": obj(
            {
                "name": {"type": "string"},
                "content_type": {"type": "string"},
                "size": {"type": "integer"},
                "sha256": {"type": "string"},
                "url": {"type": "string", "description": "Presigned download URL (expires)."},
            },
            description="A LoRA's `.safetensors` file.",
        ),
        "Model": {
            "oneOf": [ref("CatalogModel"), ref("LoraModel")],
            "discriminator": {
                "propertyName": "kind",
                "mapping": {"base": "#/components/schemas/CatalogModel", "lora": "#/components/schemas/LoraModel"},
            },
        },
    }


def key_schemas() -> dict[str, Any]:
    key = {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "role": ref("Role"),
        "tenant": {"type": "string"},
        "created_at": TIME,
        "revoked_at": NULLABLE_TIME,
    }
    return {
        "Role": {"type": "string", "enum": [role.value for role in Role], "title": "Role"},
        "Key": obj(key),
        "CreatedKey": obj(
            {**key, "key": {"type": "string", "description": "The key itself: shown in this answer only."}},
            description="A key just made, with its secret.",
        ),
    }


def event_schemas() -> dict[str, Any]:
    return {
        "JobEvent": obj(
            {
                "id": {"type": "integer", "description": "Increasing; the `id:` of its server-sent event."},
                "job_id": {"type": "string"},
                "kind": {"type": "string", "enum": [kind.value for kind in EventKind]},
                "at": TIME,
                "attempt": {"type": "integer"},
                "message": {"type": ["string", "null"]},
                "data": {"type": ["object", "null"]},
            }
        ),
        "JobEventList": obj({"items": {"type": "array", "items": ref("JobEvent")}}),
        "BulkCancelResult": obj(
            {
                "canceled": {"type": "integer", "description": "How many queued jobs were canceled."},
                "ids": {"type": "array", "items": {"type": "string"}, "description": "Their ids, oldest first."},
                "more": {"type": "boolean", "description": "`limit` was reached and matching queued jobs remain."},
            }
        ),
    }


def webhook_schemas() -> dict[str, Any]:
    attempt = obj(
        {
            "number": {"type": "integer"},
            "at": TIME,
            "status_code": {"type": ["integer", "null"]},
            "response_excerpt": {"type": ["string", "null"]},
            "error": {"type": ["string", "null"]},
            "duration_seconds": {"type": "number"},
        }
    )
    return {
        "WebhookSecret": obj(
            {
                "secret": {"type": "string", "description": "`whsec_` and base64; the HMAC key is the decoded part."},
                "created_at": TIME,
                "rotated_at": NULLABLE_TIME,
                "previous_secret_valid_until": {
                    **NULLABLE_TIME,
                    "description": "Until then the previous secret also signs (a second signature).",
                },
            }
        ),
        "WebhookEndpoint": obj(
            {
                "origin": {"type": "string"},
                "breaker": {"type": "string", "enum": ["closed", "open", "half_open"]},
                "consecutive_failures": {"type": "integer"},
                "open_until": NULLABLE_TIME,
                "in_flight": {"type": "integer"},
                "last_error": {"type": ["string", "null"]},
            },
            description="Where a delivery goes (the tenant's scheme://host:port) and its circuit breaker.",
        ),
        "WebhookDelivery": obj(
            {
                "id": {"type": "string", "description": "The `webhook-id` header: the same on every attempt."},
                "job_id": {"type": "string"},
                "event": {"type": "string", "enum": ["start", "progress", "completed"]},
                "status": {"type": "string", "enum": ["pending", "delivered", "failed", "gave_up"]},
                "attempts": {"type": "integer"},
                "next_attempt_at": NULLABLE_TIME,
                "last_error": {"type": ["string", "null"]},
                "created_at": TIME,
                "delivered_at": NULLABLE_TIME,
                "deferred": {
                    "type": ["string", "null"],
                    "description": "Why a due attempt is not being made now: the endpoint's circuit breaker is "
                    "open (or half-open with its probe in flight), or its concurrency limit is reached.",
                },
                "endpoint": {"anyOf": [ref("WebhookEndpoint"), {"type": "null"}]},
                "history": {"type": "array", "items": attempt},
                "urls": URLS,
            }
        ),
    }


def tenant_schemas() -> dict[str, Any]:
    integer = {"type": "integer", "minimum": 0}
    values = {
        "weight": {"type": "number", "exclusiveMinimum": 0},
        "max_queued_jobs": integer,
        "max_running_jobs": integer,
        "submits_per_minute": integer,
        "max_retained_bytes": integer,
        "artifact_ttl_seconds": integer,
    }
    return {
        "Quotas": obj(values, description="The effective values: the overrides over the defaults (0: no limit)."),
        "QuotaOverrides": obj(
            values, optional=values, description="What an admin set for this tenant; a missing field takes the default."
        ),
        "Tenant": obj(
            {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "created_at": TIME,
                "quotas": ref("Quotas"),
                "overrides": ref("QuotaOverrides"),
                "usage": obj(
                    {
                        "queued_jobs": {"type": "integer"},
                        "running_jobs": {
                            "type": "object",
                            "additionalProperties": {"type": "integer"},
                            "description": "Queue → jobs running on it.",
                        },
                        "submits_last_minute": {
                            "type": ["integer", "null"],
                            "description": "Submits in the current one-minute window; null when not counted "
                            "(no `submits_per_minute` quota, or Redis unavailable).",
                        },
                        "retained_bytes": {"type": "integer", "description": "Bytes of unexpired job outputs."},
                    }
                ),
            }
        ),
    }


def operation_schemas() -> dict[str, Any]:
    return {
        "Health": obj({"status": {"type": "string", "const": "ok"}}),
        "Readiness": obj(
            {
                "status": {"type": "string", "const": "ready"},
                "checks": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                    "description": "Each dependency (database, broker, redis, storage): `ok` or why it is down.",
                },
                "queues": {
                    "type": "object",
                    "description": "Each queue's work, alive consumers and stall.",
                    "additionalProperties": {"type": "object"},
                },
                "stalled_queues": {"type": "array", "items": {"type": "string"}},
            }
        ),
    }


def components() -> dict[str, Any]:
    """Every component schema but the jobs' (``api.openapi.job_schemas``)."""
    return {
        "Problem": problem(),
        "Links": {
            "type": "object",
            "title": "Links",
            "additionalProperties": {"type": "string"},
            "description": "Related API paths by name (`self`, `cancel`…).",
        },
        "File": file_schema(),
        **model_schemas(),
        **key_schemas(),
        **event_schemas(),
        **webhook_schemas(),
        **tenant_schemas(),
        **operation_schemas(),
        "KeyList": page_of("Key"),
        "ModelList": page_of("Model"),
        "TenantList": page_of("Tenant"),
        "WebhookDeliveryList": page_of("WebhookDelivery"),
    }
