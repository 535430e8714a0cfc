"""``build(app)``: the OpenAPI 3.1 document, from the app's real routes and each job type's models.

A view is in the document when ``api.openapi.document`` described it. Paths under ``/replicate/``
are left out on purpose: that blueprint imitates Replicate's API, which Replicate's own documentation
describes, and its shapes are not this API's. Tags group the operations by resource (the blueprint
that serves them); operationIds are the view functions' names, renamed in ``OPERATION_IDS`` where the
name alone would not say what the operation does. Both are part of a generated client's API (module
and function names), so a test pins them.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask

from api.openapi import examples, job_schemas, schemas
from worker.jobs import job_types

EXCLUDED_PREFIXES = ("/replicate/",)

TAGS = {
    "jobs": "Submit jobs, follow them (poll, `Prefer: wait`, server-sent events), cancel and retry them.",
    "files": "Upload input images and training datasets; jobs take them by id.",
    "models": "The catalog's base models and the tenant's fine-tuned LoRAs.",
    "webhooks": "The tenant's signing secret and each job's deliveries.",
    "keys": "API keys (admin).",
    "tenants": "Tenants, their quotas and usage.",
    "operations": "Liveness, readiness, metrics and this document.",
}
TAG_OF_BLUEPRINT = {
    "jobs": "jobs",
    "events": "jobs",
    "job_actions": "jobs",
    "files": "files",
    "models": "models",
    "webhooks": "webhooks",
    "keys": "keys",
    "tenants": "tenants",
    "health": "operations",
    "metrics": "operations",
    "openapi": "operations",
}
OPERATION_IDS = {
    "files.upload": "upload_file",
    "files.get_content": "download_file",
    "events.job_events": "get_job_events",
    "tenants.put_quotas": "set_tenant_quotas",
    "webhooks.get_secret": "get_webhook_secret",
    "webhooks.rotate_secret": "rotate_webhook_secret",
    "webhooks.list_deliveries": "list_webhook_deliveries",
    "webhooks.redeliver": "redeliver_webhook",
    "metrics.metrics": "get_metrics",
    "openapi.openapi_json": "get_openapi_document",
    "openapi.docs": "get_docs",
}

QUERY_PARAMS: dict[str, dict[str, Any]] = {
    "limit": {"schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
    "cursor": {"schema": {"type": "string"}, "description": "`next_cursor` of the previous page."},
    "status": {"schema": {"type": "string", "enum": job_schemas.STATUSES}},
    "type": {"schema": {"type": "string"}, "description": "A job type."},
    "kind": {"schema": {"type": "string", "enum": ["base", "lora"]}, "description": "Only models of this kind."},
    "last_event_id": {
        "schema": {"type": "integer", "minimum": 0},
        "description": "Resume after this event id (as the `Last-Event-ID` header; for a browser's first connect).",
    },
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
    429: "Too many requests: a quota of the tenant (`quota` names it), the key's request rate, or too many "
    "waiting requests (`Prefer: wait`); see `Retry-After` and the `RateLimit-*` header fields",
}
WAITING_ROUTES = {("/v1/jobs", "POST"), ("/v1/jobs/<job_id>", "GET")}  # the routes that take `Prefer: wait`
STREAM_DESCRIPTION = (
    "With `Accept: text/event-stream`: server-sent events, `id:` (a `JobEvent` id), `event:` "
    "(the event's kind, `milestone` for a progress row; `progress` for live progress, `job` for "
    "the final Job), `data:` (JSON); `: keep-alive` comments; the stream ends after `job`."
)


def _rule_path(rule: str) -> str:
    """``/v1/jobs/<job:job_id>`` → ``/v1/jobs/<job_id>`` (the converter is the server's business)."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"<\1>", rule)


def _parameters(rule: Any, rule_path: str, method: str, meta: dict[str, Any], max_wait: int) -> list[dict[str, Any]]:
    params = [{"name": arg, "in": "path", "required": True, "schema": {"type": "string"}} for arg in rule.arguments]
    params += [{"name": q, "in": "query", "required": False, **QUERY_PARAMS[q]} for q in meta["query"]]
    if (rule_path, method) in WAITING_ROUTES:
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
    if rule_path == "/v1/jobs" and method == "POST":
        params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "maxLength": 255},
                "description": "A repeat with the same key and body returns the first job (200).",
            }
        )
    if meta["stream"]:
        params.append(
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^[0-9]*$"},
                "description": "Resume the stream after this event id (sent by SSE clients on reconnect).",
            }
        )
    return params


def _responses(path: str, method: str, meta: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    shown = examples.RESPONSES.get((path, method), {})
    for status, name in meta["responses"].items():
        content: dict[str, Any]
        if "/" in name:  # a media type (`text/html`): a text body of that type
            content = {name: {"schema": {"type": "string"}}}
        else:
            media = "application/problem+json" if name == "Problem" else "application/json"
            content = {media: {"schema": schemas.ref(name) if name != "object" else {"type": "object"}}}
            if status in shown:
                content[media]["examples"] = shown[status]
        if status == 200 and meta["stream"]:
            content[meta["stream"]] = {"schema": {"type": "string"}}
        responses[str(status)] = {
            "description": STATUS_TEXT.get(status, str(status)),
            **({"content": content} if status not in (204, 302) else {}),
        }
    responses["default"] = {
        "description": "An error (RFC 9457)",
        "content": {
            "application/problem+json": {
                "schema": schemas.ref("Problem"),
                "examples": {"invalid": {"summary": "A field is invalid", "value": examples.PROBLEM_422}},
            }
        },
    }
    return responses


def _request_body(path: str, method: str, meta: dict[str, Any], components: dict[str, Any]) -> dict[str, Any] | None:
    if meta["form"] is not None:
        return {"required": True, "content": {"multipart/form-data": {"schema": meta["form"]}}}
    if meta["body"] is None:
        return None
    # The jobs' body is the per-type union; another body's nested models (an enum such as Role) become components.
    schema = schemas.ref("JobCreate") if path == "/v1/jobs" else job_schemas.lifted(meta["body"], components)
    media: dict[str, Any] = {"schema": schema}
    if (path, method) in examples.REQUESTS:
        media["examples"] = examples.REQUESTS[(path, method)]
    return {"required": True, "content": {"application/json": media}}


def build(app: Flask) -> dict[str, Any]:
    settings = app.config["GPUJOBS_SETTINGS"]
    types = job_types(settings)
    components = schemas.components()
    paths: dict[str, Any] = {}
    described = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        meta = getattr(app.view_functions.get(rule.endpoint), "_openapi", None)
        if meta is None or rule.rule.startswith(EXCLUDED_PREFIXES):
            continue
        described.append((rule, meta))
    create_body = next(meta["body"] for rule, meta in described if rule.rule == "/v1/jobs" and meta["body"])
    components.update(job_schemas.components(types, create_body))
    for rule, meta in described:
        rule_path = _rule_path(rule.rule)
        path = re.sub(r"<([^<>]+)>", r"{\1}", rule_path)
        blueprint, _, function = rule.endpoint.partition(".")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op: dict[str, Any] = {
                "tags": [TAG_OF_BLUEPRINT.get(blueprint, blueprint)],
                "summary": meta["summary"],
                "operationId": OPERATION_IDS.get(rule.endpoint, function),
            }
            params = _parameters(rule, rule_path, method, meta, settings.max_wait_seconds)
            if params:
                op["parameters"] = params
            body = _request_body(path, method.lower(), meta, components)
            if body is not None:
                op["requestBody"] = body
            op["responses"] = _responses(path, method.lower(), meta)
            if meta["stream"]:
                op["description"] = STREAM_DESCRIPTION
            if not meta["public"]:
                op["security"] = [{"bearer": []}]
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gpujobs",
            "version": "1",
            "description": "Self-hosted computer-vision jobs on GPU workers. Every `/v1` route takes "
            "`Authorization: Bearer <key>`; errors are `application/problem+json` (RFC 9457).",
        },
        "tags": [{"name": name, "description": text} for name, text in TAGS.items()],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
