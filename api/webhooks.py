"""Webhooks: the tenant's signing secret, and what was sent for a job (with redelivery)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flask import Blueprint, Response, g, jsonify
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from api import config
from api.auth import current_key, is_admin
from api.errors import ApiError
from api.openapi import document
from api.presenters import delivery_json, endpoint_json, page_params, paginate, webhook_secret_json
from db import endpoints, webhooks
from db.models import Job, WebhookDelivery

bp = Blueprint("webhooks", __name__, url_prefix="/v1")


def _job_id(job_id: str) -> str:
    """The job if this key may see it (its tenant's, or any for an admin), else 404."""
    query = select(Job.id).where(Job.id == job_id)
    if not is_admin():
        query = query.where(Job.tenant_id == current_key().tenant_id)
    if g.db.execute(query).first() is None:
        raise ApiError(404, f"No job {job_id!r}.")
    return job_id


def _delivery(job_id: str, delivery_id: str) -> WebhookDelivery:
    delivery: WebhookDelivery | None = g.db.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.job_id == job_id)
        .options(selectinload(WebhookDelivery.history))
        .execution_options(populate_existing=True)
    ).one_or_none()
    if delivery is None:
        raise ApiError(404, f"No webhook delivery {delivery_id!r} for job {job_id!r}.")
    return delivery


@bp.get("/webhooks/secret")
@document("Get the webhook signing secret of the key's tenant (made on first use)", responses={200: "WebhookSecret"})
def get_secret() -> Response:
    secret = webhooks.tenant_secret(g.db, current_key().tenant_id)
    g.db.commit()
    return jsonify(webhook_secret_json(secret))


@bp.post("/webhooks/secret/rotate")
@document(
    "Make a new webhook signing secret; the previous one also signs during a grace period",
    responses={200: "WebhookSecret"},
)
def rotate_secret() -> Response:
    secret = webhooks.rotate_secret(g.db, current_key().tenant_id, config.settings().webhook_secret_grace_seconds)
    g.db.commit()
    return jsonify(webhook_secret_json(secret))


@bp.get("/jobs/<job_id>/webhooks")
@document(
    "List a job's webhook deliveries, newest first, with every attempt",
    query=["limit", "cursor"],
    responses={200: "WebhookDeliveryList"},
)
def list_deliveries(job_id: str) -> Response:
    _job_id(job_id)
    limit, cursor = page_params()
    query = (
        select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).options(selectinload(WebhookDelivery.history))
    )
    rows, next_cursor = paginate(query, WebhookDelivery, limit, cursor)
    return jsonify({"items": shown_deliveries(rows), "next_cursor": next_cursor})


def shown_deliveries(rows: Sequence[WebhookDelivery]) -> list[dict[str, Any]]:
    """The deliveries as JSON, each with its endpoint's breaker and why it waits, if it does."""
    found = endpoints.shown(g.db, rows, config.settings())
    shown = []
    for row in rows:
        about = found.get(row.id)
        described = endpoint_json(about.endpoint, about.in_flight) if about is not None else None
        shown.append(delivery_json(row, described, about.deferred if about is not None else None))
    return shown


@bp.post("/jobs/<job_id>/webhooks/<delivery_id>/redeliver")
@document(
    "Send a delivery again now, as a new series of attempts with the same `webhook-id`",
    responses={202: "WebhookDelivery"},
)
def redeliver(job_id: str, delivery_id: str) -> tuple[Response, int]:
    _delivery(_job_id(job_id), delivery_id)
    webhooks.redeliver(g.db, delivery_id)
    g.db.commit()
    return jsonify(shown_deliveries([_delivery(job_id, delivery_id)])[0]), 202
