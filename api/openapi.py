"""The OpenAPI document, generated from the real routes and each job type's models."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, current_app, jsonify, render_template
from pydantic import BaseModel

from db.models import Role
from worker.jobs import job_types
from worker.jobs.spec import Artifact, JobType

F = TypeVar("F", bound=Callable[..., Any])

bp = Blueprint("openapi", __name__)

QUERY_PARAMS: dict[str, dict[str, Any]] = {
    "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
    "cursor": {"schema": {"type": "string"}, "description": "`next_cursor` of the previous page."},
    "status": {"schema": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]}},
    "type": {"schema": {"type": "string"}, "description": "A job type."},
    "kind": {"schema": {"type": "string", "enum": ["base", "lora"]}, "description": "Only models of this kind."},
    "force": {
        "schema": {"type": "boolean", "default": False},
        "description": "Revoke even the key making the request or the last active admin key.",
    },
}

STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No content",
    302: "Redirect",
    409: "Conflict",
    429: "Too many waiting requests of this key or tenant (`Prefer: wait`); see `Retry-After`",
}
WAITING_ROUTES = {("/v1/jobs", "POST"), ("/v1/jobs/<job_id>", "GET")}  # the routes that take `Prefer: wait`


def document(
    summary: str,
    *,
    body: type[BaseModel] | None = None,
    form: dict[str, Any] | None = None,
    query: list[str] | None = None,
    responses: dict[int, str] | None = None,
    public: bool = False,
) -> Callable[[F], F]:
    """Attach what the OpenAPI document says about a view; the path and method come from the route.

    ``responses`` maps a status to a component schema's name, ``object``, or a media type such as
    ``text/html`` (a text body of that type)."""

    def attach(view: F) -> F:
        view._openapi = {  # type: ignore[attr-defined]
            "summary": summary,
            "body": body,
            "form": form,
            "query": query or [],
            "responses": responses or {200: "object"},
            "public": public,
        }
        return view

    return attach


def _schema_ref(name: str) -> dict[str, Any]:
    if name == "object":
        return {"type": "object"}
    return {"$ref": f"#/components/schemas/{name}"}


def _components(types: dict[str, JobType]) -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"loc": {"type": "array", "items": {}}, "msg": {"type": "string"}},
                    },
                },
            },
        },
        "Artifact": Artifact.model_json_schema(),
        "Progress": {
            "type": "object",
            "properties": {
                "step": {"type": "integer"},
                "total": {"type": ["integer", "null"]},
                "fraction": {"type": "number"},
                "message": {"type": ["string", "null"]},
            },
        },
        "Job": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "type": {"type": "string", "enum": sorted(types)},
                "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]},
                "input": {"type": "object"},
                "metadata": {"type": "object"},
                "output": {
                    # anyOf, not oneOf: types may share an output shape (the three generation types do), so a
                    # generation output matches several branches; the `allOf` below binds it to the job's type.
                    "anyOf": [{"$ref": f"#/components/schemas/{n}Output"} for n in sorted(types)] + [{"type": "null"}],
                    "description": "The type's output (`<type>Output`) once `succeeded`, else null.",
                },
                "error": {
                    "oneOf": [
                        {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
                        {"type": "null"},
                    ]
                },
                "progress": {"$ref": "#/components/schemas/Progress"},
                "attempts": {"type": "integer"},
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": {"type": ["string", "null"], "format": "date-time"},
                "finished_at": {"type": ["string", "null"], "format": "date-time"},
                "metrics": {
                    "type": "object",
                    "properties": {
                        "queue_seconds": {"type": ["number", "null"]},
                        "run_seconds": {"type": ["number", "null"]},
                    },
                },
                "webhook": {"type": ["string", "null"]},
                "webhook_events_filter": {"type": "array", "items": {"type": "string"}},
                "urls": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "allOf": [_output_of(name) for name in sorted(types)],
        },
        "File": {
            "type": "object",
            "properties": {
                name: {"type": kind}
                for name, kind in [
                    ("id", "string"),
                    ("filename", "string"),
                    ("purpose", "string"),
                    ("content_type", "string"),
                    ("size", "integer"),
                    ("sha256", "string"),
                    ("width", "integer"),
                    ("height", "integer"),
                    ("created_at", "string"),
                ]
            },
        },
        "Model": {
            "type": "object",
            "required": ["id", "name", "kind", "base_model", "created_at"],
            "properties": {
                "id": {
                    "type": "string",
                    "description": "`mdl_…` for a fine-tuned model; the catalog name for a base model.",
                },
                "name": {"type": "string"},
                "kind": {"type": "string", "enum": ["base", "lora"]},
                "base_model": {"type": ["string", "null"], "description": "The catalog model a LoRA applies to."},
                "task": {
                    "type": "string",
                    "description": "Base models: the catalog kind (`diffusion`, `segmentation`).",
                },
                "created_at": {"type": ["string", "null"], "format": "date-time"},
                "job_id": {"type": ["string", "null"], "description": "The `finetune` job that made it."},
                "weights": {"$ref": "#/components/schemas/Artifact"},
                "details": {"type": "object", "description": "How it was trained (rank, alpha, steps, resolution…)."},
                "urls": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "Key": {
            "type": "object",
            "required": ["id", "name", "role", "tenant", "created_at", "revoked_at"],
            "properties": {
                "id": {"type": "string"},
                "name": {"type": "string"},
                "role": {"type": "string", "enum": [role.value for role in Role]},
                "tenant": {"type": "string"},
                "key": {"type": "string", "description": "The key itself: in the answer to its creation only."},
                "created_at": {"type": "string", "format": "date-time"},
                "revoked_at": {"type": ["string", "null"], "format": "date-time"},
            },
        },
    }
    schemas.update(_webhook_schemas())
    lists = [("JobList", "Job"), ("KeyList", "Key"), ("ModelList", "Model"), ("WebhookDeliveryList", "WebhookDelivery")]
    for list_name, item in lists:
        schemas[list_name] = {
            "type": "object",
            "properties": {
                "items": {"type": "array", "items": _schema_ref(item)},
                "next_cursor": {"type": ["string", "null"]},
            },
        }
    for name, job_type in sorted(types.items()):
        for suffix, model in [("Input", job_type.Input), ("Output", job_type.Output)]:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for def_name, definition in schema.pop("$defs", {}).items():
                schemas.setdefault(def_name, definition)
            schema["title"] = f"{name} {suffix.lower()}"
            if suffix == "Input":
                schema["description"] = job_type.summary + (" Admin keys only." if job_type.admin_only else "")
            schemas[f"{name}{suffix}"] = schema
    return schemas


def _output_of(name: str) -> dict[str, Any]:
    """A job of type ``name`` has that type's output, or none."""
    return {
        "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
        "then": {
            "properties": {"output": {"anyOf": [{"$ref": f"#/components/schemas/{name}Output"}, {"type": "null"}]}}
        },
    }


def _webhook_schemas() -> dict[str, Any]:
    time = {"type": ["string", "null"], "format": "date-time"}
    return {
        "WebhookSecret": {
            "type": "object",
            "properties": {
                "secret": {"type": "string", "description": "`whsec_` and base64; the HMAC key is the decoded part."},
                "created_at": {"type": "string", "format": "date-time"},
                "rotated_at": time,
                "previous_secret_valid_until": {
                    **time,
                    "description": "Until then the previous secret also signs (a second signature).",
                },
            },
        },
        "WebhookDelivery": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "description": "The `webhook-id` header: the same on every attempt."},
                "job_id": {"type": "string"},
                "event": {"type": "string", "enum": ["start", "progress", "completed"]},
                "status": {"type": "string", "enum": ["pending", "delivered", "failed", "gave_up"]},
                "attempts": {"type": "integer"},
                "next_attempt_at": time,
                "last_error": {"type": ["string", "null"]},
                "created_at": {"type": "string", "format": "date-time"},
                "delivered_at": time,
                "history": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "number": {"type": "integer"},
                            "at": {"type": "string", "format": "date-time"},
                            "status_code": {"type": ["integer", "null"]},
                            "response_excerpt": {"type": ["string", "null"]},
                            "error": {"type": ["string", "null"]},
                            "duration_seconds": {"type": "number"},
                        },
                    },
                },
                "urls": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
    }


def _job_create_schema(model: type[BaseModel], types: dict[str, JobType]) -> dict[str, Any]:
    """``POST /v1/jobs``: the envelope, with ``input`` chosen by ``type``."""
    base = model.model_json_schema()
    variants = []
    for name in sorted(types):
        variant = {
            **base,
            "title": f"Create a {name} job",
            "properties": {
                **base["properties"],
                "type": {"const": name},
                "input": {"$ref": f"#/components/schemas/{name}Input"},
            },
        }
        if any(field.is_required() for field in types[name].Input.model_fields.values()):
            # `input` defaults to {}, which an input with required fields refuses: then it is required.
            variant["required"] = [*base.get("required", []), "input"]
        variants.append(variant)
    return {"oneOf": variants, "discriminator": {"propertyName": "type"}}


def build(app: Flask) -> dict[str, Any]:
    types = job_types(app.config["GPUJOBS_SETTINGS"])
    max_wait = app.config["GPUJOBS_SETTINGS"].max_wait_seconds
    schemas = _components(types)
    paths: dict[str, Any] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions.get(rule.endpoint)
        meta = getattr(view, "_openapi", None)
        if meta is None:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op: dict[str, Any] = {"summary": meta["summary"], "operationId": rule.endpoint.replace(".", "_")}
            params = [
                {"name": arg, "in": "path", "required": True, "schema": {"type": "string"}} for arg in rule.arguments
            ]
            params += [{"name": q, "in": "query", "required": False, **QUERY_PARAMS[q]} for q in meta["query"]]
            if (rule.rule, method) in WAITING_ROUTES:
                params.append(
                    {
                        "name": "Prefer",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": f"`wait=N` (N ≤ {max_wait}; more is taken as {max_wait}): hold the answer "
                        "until the job finishes or N seconds pass. Concurrent waits are capped per key and per "
                        "tenant (429 with `Retry-After`).",
                    }
                )
            if rule.rule == "/v1/jobs" and method == "POST":
                params.append(
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "maxLength": 255},
                    }
                )
            if params:
                op["parameters"] = params
            if meta["body"] is not None:
                if rule.rule == "/v1/jobs":
                    schema = _job_create_schema(meta["body"], types)
                else:  # its nested models (an enum such as Role) become components, like the job inputs'
                    schema = meta["body"].model_json_schema(ref_template="#/components/schemas/{model}")
                    for def_name, definition in schema.pop("$defs", {}).items():
                        schemas.setdefault(def_name, definition)
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
            if meta["form"] is not None:
                op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": meta["form"]}}}
            responses: dict[str, Any] = {}
            for status, name in meta["responses"].items():
                if "/" in name:  # a media type (`text/html`): a text body of that type
                    content = {name: {"schema": {"type": "string"}}}
                else:
                    media = "application/problem+json" if name == "Problem" else "application/json"
                    content = {media: {"schema": _schema_ref(name)}}
                responses[str(status)] = {
                    "description": STATUS_TEXT.get(status, str(status)),
                    **({"content": content} if status not in (204, 302) else {}),
                }
            responses["default"] = {
                "description": "An error (RFC 9457)",
                "content": {"application/problem+json": {"schema": _schema_ref("Problem")}},
            }
            op["responses"] = responses
            if not meta["public"]:
                op["security"] = [{"bearer": []}]
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpujobs", "version": "1", "description": "Self-hosted computer-vision jobs on GPU workers."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@bp.get("/openapi.json")
@document("This document", public=True)
def openapi_json() -> Response:
    return jsonify(build(current_app))


@bp.get("/docs")
@document("Human-readable API reference", public=True, responses={200: "text/html"})
def docs() -> str:
    spec = build(current_app)
    types = job_types(current_app.config["GPUJOBS_SETTINGS"])
    return render_template("docs.html", spec=spec, job_types=sorted(types.items()))
