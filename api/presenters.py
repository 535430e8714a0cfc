"""How resources look on the wire (docs/api.md), and list pagination."""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime
from typing import Any

from flask import g, request
from sqlalchemy import Select, and_, or_

from api.errors import validation_error
from db.models import ApiKey, File, WebhookDelivery, WebhookEndpoint, WebhookSecret
from db.wire import job_json, rfc3339

ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # every id this API hands out: a prefix and url-safe base64

__all__ = [
    "delivery_json",
    "endpoint_json",
    "file_json",
    "job_json",
    "key_json",
    "page_params",
    "paginate",
    "rfc3339",
    "webhook_secret_json",
]


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
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None or not ID.fullmatch(str(ident)):
            raise ValueError("not a cursor of ours")
        return limit, (created_at, str(ident))
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise validation_error(["query", "cursor"], "is not a cursor this API returned") from None


def paginate(
    query: Select[Any], model: Any, limit: int, cursor: tuple[datetime, str] | None
) -> tuple[list[Any], str | None]:
    """Newest first, keyed on (created_at, id) so pages are stable while rows are added."""
    if cursor is not None:
        created, ident = cursor
        query = query.where(or_(model.created_at < created, and_(model.created_at == created, model.id < ident)))
    rows = list(g.db.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).unique())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = (
            base64.urlsafe_b64encode(json.dumps([last.created_at.isoformat(), last.id]).encode()).decode().rstrip("=")
        )
    return rows, next_cursor


def webhook_secret_json(secret: WebhookSecret) -> dict[str, Any]:
    return {
        "secret": secret.secret,
        "created_at": rfc3339(secret.created_at),
        "rotated_at": rfc3339(secret.rotated_at),
        "previous_secret_valid_until": rfc3339(secret.previous_valid_until),
    }


def endpoint_json(endpoint: WebhookEndpoint, in_flight: int) -> dict[str, Any]:
    """Where a delivery goes and its circuit breaker, as the delivery log and the dashboard show it."""
    return {
        "origin": endpoint.origin,
        "breaker": endpoint.state,
        "consecutive_failures": endpoint.consecutive_failures,
        "open_until": rfc3339(endpoint.open_until),
        "in_flight": in_flight,
        "last_error": endpoint.last_error,
    }


def delivery_json(
    delivery: WebhookDelivery, endpoint: dict[str, Any] | None = None, deferred: str | None = None
) -> dict[str, Any]:
    base = f"/v1/jobs/{delivery.job_id}/webhooks/{delivery.id}"
    return {
        "id": delivery.id,  # also the `webhook-id` header, the same on every attempt
        "job_id": delivery.job_id,
        "event": delivery.event,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": rfc3339(delivery.next_attempt_at),
        "last_error": delivery.last_error,
        "created_at": rfc3339(delivery.created_at),
        "delivered_at": rfc3339(delivery.delivered_at),
        "deferred": deferred,  # why a due attempt is not being made now (breaker open, endpoint busy)
        "endpoint": endpoint,
        "history": [
            {
                "number": attempt.number,
                "at": rfc3339(attempt.at),
                "status_code": attempt.status_code,
                "response_excerpt": attempt.response_excerpt,
                "error": attempt.error,
                "duration_seconds": attempt.duration_seconds,
            }
            for attempt in delivery.history
        ],
        "urls": {"redeliver": f"{base}/redeliver"},
    }
