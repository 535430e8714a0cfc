"""Actions on jobs beyond one submit: ``POST /v1/jobs/{id}/retry`` and the admin bulk cancel ``POST /v1/jobs/cancel``.

A retry is a new job (the original keeps its history): the same type, input, metadata, webhook and
priority, in the original's tenant, with ``retry_of`` naming the original. It goes through the submit's
own path (``api.jobs.create_and_send``: the quota check, the insert, the send). Only a failed or canceled
job is retried: a succeeded one has its result, and a new run of the same input is an ordinary submit.
The dashboard's "retry" (``transitions.retry``) is different: it runs the same job again, as an operator.

The bulk cancel drains a bad backlog: the queued jobs of a type and/or a tenant, oldest first, in batches
of ``BATCH`` (one transaction each, so no long lock), up to ``limit``. Only queued jobs: a job that starts
meanwhile is left running (cancel it by its id), so the filter means what it says.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from flask import Blueprint, Response, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from api import config, quotas
from api.auth import current_key, is_admin, require_admin
from api.body import json_object
from api.errors import ApiError, from_pydantic, validation_error
from api.jobs import JobCreate, create_and_send, repeat
from api.openapi import document
from db import transitions
from db.models import Job, JobStatus, Tenant
from worker.jobs import job_types

bp = Blueprint("job_actions", __name__, url_prefix="/v1/jobs")

RETRYABLE = (JobStatus.FAILED.value, JobStatus.CANCELED.value)
BATCH = 200  # jobs canceled per transaction by the bulk cancel


@bp.post("/<job_id>/retry")
@document("Retry a failed or canceled job as a new job", responses={202: "Job", 200: "Job", 409: "Problem"})
def retry_job(job_id: str) -> tuple[Response, int, dict[str, str]]:
    settings = config.settings()
    query = select(Job).where(Job.id == job_id)
    if not is_admin():
        query = query.where(Job.tenant_id == current_key().tenant_id)
    job = g.db.scalars(query).one_or_none()
    if job is None:
        raise ApiError(404, f"No job {job_id!r}.")
    if job.status not in RETRYABLE:
        why = "it has its result; submit it again for a new run" if job.status == "succeeded" else "it has not finished"
        raise ApiError(409, f"Only a failed or canceled job can be retried; this one is {job.status} ({why}).")
    job_type = job_types(settings).get(job.type)
    if job_type is None:
        raise ApiError(409, f"This service no longer runs `{job.type}` jobs.")
    if job_type.admin_only and not is_admin():
        raise ApiError(403, f"`{job.type}` jobs need an admin key.")
    try:
        params = job_type.Input.model_validate(job.input)
        spec = JobCreate(
            type=job.type,
            input=job.input,
            webhook=job.webhook,
            webhook_events_filter=job.webhook_events_filter,
            metadata=job.meta,
        )
    except ValidationError as exc:
        raise ApiError(409, f"The job's input is no longer valid for `{job.type}`: {exc.errors()[0]['msg']}.") from None

    idempotency_key = request.headers.get("Idempotency-Key")
    request_hash = None
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise validation_error(["header", "Idempotency-Key"], "must be 1 to 255 characters")
        request_hash = hashlib.sha256(json.dumps({"retry_of": job.id}).encode()).hexdigest()
        existing = g.db.scalars(
            select(Job).where(Job.tenant_id == job.tenant_id, Job.idempotency_key == idempotency_key)
        ).one_or_none()
        if existing is not None:
            return repeat(existing, request_hash)

    quotas.admit(g.db, job.tenant_id, settings)  # the new job counts against its tenant, as a submit does
    return create_and_send(
        spec,
        job_type,
        params,
        idempotency_key,
        request_hash,
        None,
        tenant_id=job.tenant_id,
        retry_of=job.id,
        priority=job.priority,
    )


class BulkCancel(BaseModel):
    """The body of ``POST /v1/jobs/cancel``: which queued jobs to cancel."""

    model_config = ConfigDict(extra="forbid")

    type: str | None = Field(None, max_length=64, description="Only jobs of this type.")
    tenant: str | None = Field(None, max_length=64, description="Only jobs of this tenant (`ten_…`).")
    status: Literal["queued"] = Field("queued", description="Only queued jobs are canceled in bulk.")
    all: bool = Field(False, strict=True, description="Allow neither `type` nor `tenant`: every queued job.")
    limit: int = Field(1000, ge=1, le=10000, strict=True, description="At most this many jobs (oldest first).")


@bp.post("/cancel")
@require_admin
@document("Cancel queued jobs by type and/or tenant (admin)", body=BulkCancel, responses={200: "BulkCancelResult"})
def cancel_jobs() -> Response:
    try:
        spec = BulkCancel.model_validate(json_object())
    except ValidationError as exc:
        raise from_pydantic(exc, ["body"]) from None
    if spec.type is None and spec.tenant is None and not spec.all:
        raise validation_error(["body"], "name a `type` or a `tenant` (or both), or set `all` to true")
    if spec.type is not None and spec.type not in job_types(config.settings()):
        raise validation_error(["body", "type"], f"unknown job type {spec.type!r}")
    if spec.tenant is not None and g.db.get(Tenant, spec.tenant) is None:
        raise validation_error(["body", "tenant"], f"no tenant {spec.tenant!r}")

    query = select(Job.id).where(Job.status == JobStatus.QUEUED.value)
    if spec.type is not None:
        query = query.where(Job.type == spec.type)
    if spec.tenant is not None:
        query = query.where(Job.tenant_id == spec.tenant)
    query = query.order_by(Job.created_at, Job.id)
    message = f"canceled by an operator (bulk cancel, key {current_key().id})"
    ids: list[str] = []
    while len(ids) < spec.limit:
        batch = list(g.db.scalars(query.limit(min(BATCH, spec.limit - len(ids)))))
        if not batch:
            break
        ids += [job_id for job_id in batch if transitions.cancel_queued(g.db, job_id, message)]
        g.db.commit()
    more = len(ids) >= spec.limit and g.db.scalars(query.limit(1)).first() is not None
    g.db.commit()
    return jsonify({"canceled": len(ids), "ids": ids, "more": more})
