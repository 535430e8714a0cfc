"""How resources look on the wire (API.md), and list pagination."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any

from flask import g, request
from sqlalchemy import Select, and_, or_

from api.errors import validation_error
from db.models import ApiKey, File, Job, JobStatus
from db.storage import get_storage


def rfc3339(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def _with_urls(value: Any, artifacts: dict[str, str]) -> Any:
    """Add a fresh presigned ``url`` to every artifact found in a job's output."""
    if isinstance(value, dict):
        if value.get("name") in artifacts and {"content_type", "size", "sha256"} <= value.keys():
            return {**value, "url": get_storage().presigned_url(artifacts[value["name"]])}
        return {k: _with_urls(v, artifacts) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_urls(v, artifacts) for v in value]
    return value


def job_json(job: Job) -> dict[str, Any]:
    progress = {"step": 0, "total": None, "fraction": 0.0, "message": None, **(job.progress or {})}
    output = job.output
    if output is not None and job.status == JobStatus.SUCCEEDED.value:
        output = _with_urls(output, {a.name: a.storage_key for a in job.artifacts})
    return {
        "id": job.id,
        "type": job.type,
        "status": job.status,
        "input": job.input,
        "metadata": job.meta,
        "output": output,
        "error": job.error,
        "progress": progress,
        "attempts": job.attempts,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "metrics": {
            "queue_seconds": _seconds(job.created_at, job.started_at),
            "run_seconds": _seconds(job.started_at, job.finished_at),
        },
        "webhook": job.webhook,
        "webhook_events_filter": job.webhook_events_filter,
        "urls": {"self": f"/v1/jobs/{job.id}", "cancel": f"/v1/jobs/{job.id}/cancel"},
    }


def file_json(file: File) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": file.id,
        "filename": file.filename,
        "purpose": file.purpose,
        "content_type": file.content_type,
        "size": file.size,
        "sha256": file.sha256,
        "created_at": rfc3339(file.created_at),
        "urls": {"self": f"/v1/files/{file.id}", "content": f"/v1/files/{file.id}/content"},
    }
    if file.width is not None:
        body["width"], body["height"] = file.width, file.height
    return body


def key_json(key: ApiKey, plaintext: str | None = None) -> dict[str, Any]:
    body = {
        "id": key.id,
        "name": key.name,
        "role": key.role,
        "tenant": key.tenant_id,
        "created_at": rfc3339(key.created_at),
        "revoked_at": rfc3339(key.revoked_at),
    }
    if plaintext:
        body["key"] = plaintext
    return body


# --- pagination ------------------------------------------------------------------


def page_params() -> tuple[int, tuple[datetime, str] | None]:
    raw_limit = request.args.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        raise validation_error(["query", "limit"], "must be an integer from 1 to 100") from None
    if not 1 <= limit <= 100:
        raise validation_error(["query", "limit"], "must be an integer from 1 to 100")
    raw_cursor = request.args.get("cursor")
    if not raw_cursor:
        return limit, None
    try:
        created, ident = json.loads(base64.urlsafe_b64decode(raw_cursor.encode() + b"==="))
        return limit, (datetime.fromisoformat(created), str(ident))
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise validation_error(["query", "cursor"], "is not a cursor this API returned") from None


def paginate(query: Select[Any], model: Any, limit: int, cursor: tuple[datetime, str] | None) -> tuple[list[Any], str | None]:
    """Newest first, keyed on (created_at, id) so pages are stable while rows are added."""
    if cursor is not None:
        created, ident = cursor
        query = query.where(or_(model.created_at < created, and_(model.created_at == created, model.id < ident)))
    rows = list(g.db.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).unique())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = base64.urlsafe_b64encode(json.dumps([last.created_at.isoformat(), last.id]).encode()).decode().rstrip("=")
    return rows, next_cursor
