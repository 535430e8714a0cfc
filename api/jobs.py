"""/v1/jobs: create (idempotent, optionally waiting), read, list, cancel."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

from flask import Blueprint, Response, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import joinedload, selectinload
from werkzeug.routing import BaseConverter

from api import config, quotas, remote_inputs, waiting
from api.auth import current_key, is_admin
from api.body import json_object
from api.errors import ApiError, from_pydantic, validation_error
from api.models import readable_catalog
from api.openapi import document
from api.presenters import job_json, page_params, paginate
from db import clock, tracing, transitions
from db.models import File, Job, JobStatus, Model, new_id
from worker import metrics
from worker.dispatcher import dispatch_soon
from worker.jobs import job_types
from worker.jobs.spec import JobInput, JobType, TenantModelRef, catalog_fields, file_fields
from worker.models.catalog import Catalog, CatalogError
from worker.webhooks import guard

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")


class JobIdConverter(BaseConverter):
    """A job id in ``/v1/jobs/<job:job_id>``: any path segment but ``cancel``, the bulk cancel's own path.

    Without it ``/v1/jobs/cancel`` would also match the job route, and the answers to its other methods
    (``OPTIONS``, a 405's ``Allow``) would list ``GET`` beside its ``POST`` (found by schemathesis)."""

    regex = r"(?!cancel$)[^/]+"


WebhookEvent = Literal["start", "progress", "completed"]


def _completed_only() -> list[WebhookEvent]:
    return ["completed"]


class JobCreate(BaseModel):
    """The body of ``POST /v1/jobs``; ``input`` is checked against the type's own ``Input``."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="A job type, e.g. `text_to_image`; see the per-type input schemas.")
    input: dict[str, Any] = Field(default_factory=dict, description="The type's input.")
    webhook: str | None = Field(None, max_length=2048, description="An http(s) URL that receives events.")
    webhook_events_filter: list[WebhookEvent] = Field(
        default_factory=_completed_only, description="Which events to send (default: `completed`)."
    )
    metadata: dict[str, Any] = Field(default_factory=dict, description="Client data, returned as is.")
    priority: StrictInt = Field(
        5,
        ge=0,
        le=9,
        description="0 (lowest) to 9 (highest): orders this tenant's own queued jobs; between tenants the "
        "scheduler shares the workers fairly.",
    )

    @field_validator("webhook")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/?#]+", value, re.IGNORECASE):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("webhook_events_filter")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


def _visible(query: Any) -> Any:
    return query if is_admin() else query.where(Job.tenant_id == current_key().tenant_id)


@functools.cache
def _job_query(scoped: bool) -> Any:
    """A job with its artifacts and retries, built once (every read and every waited answer): one statement,
    both collections joined (a job has a few artifacts and rarely a retry, so the product of the two stays
    small), where a second SELECT for the retries cost every read a round trip. ``scoped``: the caller's
    tenant's only."""
    query = select(Job).where(Job.id == bindparam("job_id"))
    if scoped:
        query = query.where(Job.tenant_id == bindparam("tenant_id"))
    options = (joinedload(Job.artifacts), joinedload(Job.retries))
    return query.options(*options).execution_options(populate_existing=True)


def _load(job_id: str) -> Job:
    scoped = not is_admin()
    params = {"job_id": job_id, "tenant_id": current_key().tenant_id} if scoped else {"job_id": job_id}
    job: Job | None = g.db.scalars(_job_query(scoped), params).unique().one_or_none()
    if job is None:
        raise ApiError(404, f"No job {job_id!r}.")
    return job


def _prefer_wait() -> float | None:
    prefer = request.headers.get("Prefer")
    if not prefer:
        return None
    for token in prefer.split(","):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = int(value.strip().strip('"'))
            except ValueError:
                raise validation_error(["header", "Prefer"], "wait must be a whole number of seconds") from None
            if seconds < 0:
                raise validation_error(["header", "Prefer"], "wait must not be negative")
            return float(min(seconds, config.settings().max_wait_seconds))
    return None


def _reserve_wait(wait: float | None) -> AbstractContextManager[None]:
    """One of the key's and the tenant's concurrent waits for the block (429 over a cap); nothing without a wait."""
    if not wait:
        return nullcontext()
    key = current_key()
    return waiting.listener(config.settings()).reserve(key.id, key.tenant_id, wait, config.settings())


@functools.cache
def _status() -> Any:
    """A waiting submit's read of its job's status, built once."""
    return select(Job.status).where(Job.id == bindparam("job_id"))


def _wait_for_finish(job_id: str, seconds: float, registered: threading.Event | None = None) -> None:
    """Park until the job finishes or ``seconds`` pass (see ``api.waiting``), holding no database connection.

    ``registered``: the waiter a submit registered before its commit (no first read of the job)."""

    def finished() -> bool:
        status = g.db.execute(_status(), {"job_id": job_id}).scalar_one()
        if JobStatus(status).finished:
            return True  # the wait is over: the answer's read follows on this connection (no checkout)
        # End the read: the connection goes back to the pool while the request waits, and the
        # next read sees new commits (nothing is expired: expire_on_commit is off).
        g.db.commit()
        return False

    waiting.listener(config.settings()).wait(job_id, seconds, finished, registered)


@bp.post("")
@document("Create a job", body=JobCreate, responses={202: "Job", 200: "Job", 429: "Problem"})
def create_job() -> tuple[Response, int, dict[str, str]]:
    body = json_object()
    try:
        spec = JobCreate.model_validate(body)
    except ValidationError as exc:
        raise from_pydantic(exc, ["body"]) from None
    wait = _prefer_wait()
    job, status = submit(spec, body, wait)
    return job_answer(job, status, wait)


def submit(spec: JobCreate, body: dict[str, Any], wait: float | None) -> tuple[Job, int]:
    """Everything ``POST /v1/jobs`` does with a parsed body: checks, idempotency, quotas, insert, send, wait.

    The one submit path: the Replicate-compatible surface (``api.replicate``) submits through it too.
    ``body`` is what the idempotency hash covers. Returns the job and 202 (new) or 200 (an idempotent repeat)."""
    settings = config.settings()
    served = job_types(settings)
    job_type = served.get(spec.type)
    if job_type is None:
        known = ", ".join(sorted(n for n, t in served.items() if is_admin() or not t.admin_only))
        raise validation_error(["body", "type"], f"unknown job type {spec.type!r}; known types: {known}")
    if job_type.admin_only and not is_admin():
        raise ApiError(403, f"`{spec.type}` jobs need an admin key.")
    try:
        params = job_type.Input.model_validate(spec.input)
    except ValidationError as exc:
        raise from_pydantic(exc, ["body", "input"]) from None
    _check_files(params)
    refs = params.tenant_model_refs()
    catalog = _check_models(params, needed=bool(refs))
    _check_tenant_models(refs, catalog)
    if spec.webhook is not None:
        _check_webhook(spec.webhook)
    if len(json.dumps(spec.metadata)) > settings.max_json_field_bytes:
        raise validation_error(["body", "metadata"], f"must be at most {settings.max_json_field_bytes} bytes of JSON")

    idempotency_key = request.headers.get("Idempotency-Key")
    request_hash = None
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 255:
            raise validation_error(["header", "Idempotency-Key"], "must be 1 to 255 characters")
        request_hash = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        existing = _by_idempotency_key(idempotency_key)
        if existing is not None:
            return repeated(existing, request_hash), 200

    # After the idempotency check: repeating a job that exists is never refused by a quota.
    quotas.admit(g.db, current_key().tenant_id, settings)
    params = remote_inputs.resolve(params)  # image URLs and data URIs become files (committed with the job)
    with _reserve_wait(wait):
        return insert_and_send(spec, job_type, params, idempotency_key, request_hash, wait)


def job_answer(job: Job, status: int, wait: float | None) -> tuple[Response, int, dict[str, str]]:
    """The answer to a submit: the Job, 202 or 200, its ``Location`` (and ``Preference-Applied`` after a wait)."""
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if wait and status == 202:
        headers["Preference-Applied"] = f"wait={int(wait)}"
    return jsonify(job_json(job)), status, headers


def create_and_send(
    spec: JobCreate,
    job_type: JobType,
    params: JobInput,
    idempotency_key: str | None,
    request_hash: str | None,
    wait: float | None,
    tenant_id: str | None = None,
    **columns: Any,
) -> tuple[Response, int, dict[str, str]]:
    """``insert_and_send``, answered as ``POST /v1/jobs`` answers."""
    job, status = insert_and_send(spec, job_type, params, idempotency_key, request_hash, wait, tenant_id, **columns)
    return job_answer(job, status, wait)


def insert_and_send(
    spec: JobCreate,
    job_type: JobType,
    params: JobInput,
    idempotency_key: str | None,
    request_hash: str | None,
    wait: float | None,
    tenant_id: str | None = None,
    **columns: Any,
) -> tuple[Job, int]:
    """Insert the job, commit, send it, and wait if asked (inside the caller's wait reservation).

    The job is the caller's tenant's unless ``tenant_id`` says otherwise; ``columns`` are more of its
    columns (a retry's ``retry_of`` and ``priority``). Returns the job (read again after a wait) and 202,
    or the first job and 200 when another request with the same idempotency key won the insert."""
    settings = config.settings()
    tenant_id = tenant_id or current_key().tenant_id
    job = Job(
        tenant_id=tenant_id,
        type=job_type.name,
        queue=job_type.queue.value,
        input=params.model_dump(mode="json"),
        meta=spec.metadata,
        max_attempts=settings.max_attempts,
        deadline_seconds=job_type.deadline_seconds or settings.job_deadline_seconds,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        webhook=spec.webhook,
        webhook_events_filter=spec.webhook_events_filter,
        traceparent=tracing.traceparent(),  # this request's span: the job's later spans join its trace
        **({"priority": spec.priority} | columns),
    )
    job.id = new_id("job")
    # A waiting submit registers its waiter before the commit: the job cannot finish unseen, so the wait
    # starts without reading it back.
    with waiting.listener(settings).expecting(job.id) if wait else nullcontext() as registered:
        try:
            _use_files(params, tenant_id)
            transitions.create(g.db, job)
            g.db.commit()
        except IntegrityError:
            g.db.rollback()
            existing = _by_idempotency_key(idempotency_key, tenant_id) if idempotency_key else None
            if existing is None:
                raise
            return repeated(existing, request_hash), 200
        metrics.JOBS_SUBMITTED.labels(job.type, job.queue).inc()

        log.info("job %s (%s) submitted on queue %s", job.id, job.type, job.queue, extra={"job_id": job.id})
        # Commit first, then let the scheduler send what the queue can take (this job, if its tenant's turn
        # comes); what the broker refuses, or that waits for a slot, a later pass sends.
        dispatch_soon(job.queue, settings, submitted=job.id)

        if wait:
            _wait_for_finish(job.id, wait, registered)
            job = _load(job.id)
    return job, 202


def _input_files(params: JobInput) -> dict[str, tuple[str, str]]:
    """Each value of the input's file fields (a file id, or a URL or data URI not resolved yet): its field and
    the purpose the field takes."""
    found: dict[str, tuple[str, str]] = {}
    for field, purpose in file_fields(type(params)).items():
        value = getattr(params, field)
        for file_id in value if isinstance(value, list) else [value]:
            if file_id is not None:
                found[file_id] = (field, purpose)
    return found


def _check_files(params: JobInput) -> None:
    """Every file id in the input names an upload of this tenant, with the right purpose (else 422)."""
    # URLs and data URIs are resolved into files after the checks.
    wanted = {value: where for value, where in _input_files(params).items() if not remote_inputs.is_remote(value)}
    if not wanted:
        return
    rows = g.db.execute(
        select(File.id, File.purpose).where(File.id.in_(wanted), File.tenant_id == current_key().tenant_id)
    ).all()
    found = dict(rows)
    for file_id, (field, purpose) in wanted.items():
        if file_id not in found:
            raise validation_error(["body", "input", field], f"no file {file_id!r} (upload it with POST /v1/files)")
        if found[file_id] != purpose:
            raise validation_error(
                ["body", "input", field], f"file {file_id!r} was uploaded as {found[file_id]}, not as {purpose}"
            )


def _use_files(params: JobInput, tenant_id: str) -> None:
    """Mark the input's files used now, in the job's transaction (the clock of ``GPUJOBS_FILE_TTL``); 422 for
    one that retention deleted since ``_check_files`` saw it.

    The UPDATE locks the rows until the commit: a retention batch (``FOR UPDATE SKIP LOCKED``) passes them
    by, and one that locked them first has deleted them when this statement reads them, so a job is never
    committed naming a file that is gone."""
    wanted = _input_files(params)
    if not wanted:
        return
    touched = update(File).where(File.id.in_(list(wanted)), File.tenant_id == tenant_id)
    used = set(g.db.scalars(touched.values(used_at=clock.now(g.db)).returning(File.id)))
    for file_id, (field, _) in wanted.items():
        if file_id not in used:  # the request's session is rolled back as it closes
            raise validation_error(
                ["body", "input", field], f"no file {file_id!r} (it was deleted; upload it again with POST /v1/files)"
            )


def _check_models(params: JobInput, needed: bool) -> Catalog | None:
    """Every catalog model the input names is in the service's catalog, of the kind the job runs (else 422).

    The API reads the same catalog file as the workers (``GPUJOBS_MODEL_CATALOG``); if it cannot, the
    names are left to the worker (which fails the job, saying why) rather than refusing every job.
    Returns the catalog if it was read: when the input names catalog models, or ``needed`` (the tenant
    models it names are checked against the catalog's default base model).
    """
    named = {field: kind for field, kind in catalog_fields(type(params)).items() if getattr(params, field) is not None}
    catalog = readable_catalog() if named or needed else None
    if catalog is None:
        return None
    for field, kind in named.items():
        name = getattr(params, field)
        entry = catalog.entries.get(name)
        if entry is None or entry.kind != kind:
            known = ", ".join(sorted(n for n, e in catalog.entries.items() if e.kind == kind)) or "none"
            found = f"{name!r} is a {entry.kind} model, not a {kind} model" if entry else f"no model {name!r}"
            raise validation_error(
                ["body", "input", field],
                f"{found} in this service's catalog (its {kind} models: {known}; GET /v1/models lists them)",
            )
    return catalog


def _check_tenant_models(refs: list[TenantModelRef], catalog: Catalog | None) -> None:
    """Every fine-tuned model the input names is this tenant's, made for the base model the job runs (else 422)."""
    if not refs:
        return
    rows = g.db.execute(
        select(Model.id, Model.base_model).where(
            Model.id.in_([ref.model_id for ref in refs]), Model.tenant_id == current_key().tenant_id
        )
    ).all()
    bases = dict(rows)
    for ref in refs:
        loc = ["body", "input", *ref.loc]
        if ref.model_id not in bases:
            raise validation_error(loc, f"no model {ref.model_id!r} (GET /v1/models lists this tenant's models)")
        base = ref.base_model or _default_model(catalog, ref.base_kind)
        if base is not None and bases[ref.model_id] != base:
            raise validation_error(
                loc, f"model {ref.model_id!r} is a LoRA of {bases[ref.model_id]!r}, but this job runs {base!r}"
            )


def _default_model(catalog: Catalog | None, kind: str) -> str | None:
    """The catalog's default model of ``kind`` (None when there is none, or no readable catalog)."""
    if catalog is None:
        return None
    try:
        return catalog.default_for(kind).name
    except CatalogError:
        return None


def _check_webhook(url: str) -> None:
    """Refuse at once a webhook URL that can only be refused (a private address, ``localhost``).

    Names are resolved and checked again when the webhook is sent."""
    try:
        guard.check_url(url, config.settings().webhook_allow_private)
    except guard.Refused as exc:
        raise validation_error(["body", "webhook"], str(exc)) from None


def _by_idempotency_key(key: str, tenant_id: str | None = None) -> Job | None:
    job: Job | None = g.db.scalars(
        select(Job).where(Job.tenant_id == (tenant_id or current_key().tenant_id), Job.idempotency_key == key)
    ).one_or_none()
    return job


def repeat(existing: Job, request_hash: str | None) -> tuple[Response, int, dict[str, str]]:
    return jsonify(job_json(repeated(existing, request_hash))), 200, {"Location": f"/v1/jobs/{existing.id}"}


def repeated(existing: Job, request_hash: str | None) -> Job:
    """The job an idempotency key named, read whole, if the request repeats its body (else 422)."""
    if existing.request_hash != request_hash:
        raise validation_error(
            ["header", "Idempotency-Key"],
            "was already used with a different request body",
            detail=f"This Idempotency-Key was used for job {existing.id} with a different body.",
        )
    return _load(existing.id)


@bp.get("")
@document("List jobs, newest first", query=["status", "type", "limit", "cursor"], responses={200: "JobList"})
def list_jobs() -> Response:
    limit, cursor = page_params()
    query = _visible(select(Job)).options(selectinload(Job.artifacts), selectinload(Job.retries))
    status = request.args.get("status")
    if status is not None:  # `?status=` is not "any status"
        if status not in {s.value for s in JobStatus}:
            raise validation_error(["query", "status"], f"must be one of {', '.join(s.value for s in JobStatus)}")
        query = query.where(Job.status == status)
    job_type = request.args.get("type")
    if job_type is not None:
        if job_type not in job_types(config.settings()):
            raise validation_error(["query", "type"], f"unknown job type {job_type!r}")
        query = query.where(Job.type == job_type)
    jobs, next_cursor = paginate(query, Job, limit, cursor)
    return jsonify({"items": [job_json(job) for job in jobs], "next_cursor": next_cursor})


@bp.get("/<job:job_id>")
@document("Get a job", responses={200: "Job", 429: "Problem"})
def get_job(job_id: str) -> Response:
    wait = _prefer_wait()
    if not wait:
        return jsonify(job_json(_load(job_id)))
    _load(job_id)  # 404 before waiting
    with _reserve_wait(wait):
        _wait_for_finish(job_id, wait)
    response = jsonify(job_json(_load(job_id)))
    response.headers["Preference-Applied"] = f"wait={int(wait)}"
    return response


@bp.post("/<job_id>/cancel")
@document("Cancel a job", responses={202: "Job", 409: "Problem"})
def cancel_job(job_id: str) -> tuple[Response, int]:
    _load(job_id)
    request_cancel(job_id)
    g.db.expire_all()
    return jsonify(job_json(_load(job_id))), 202


def request_cancel(job_id: str) -> JobStatus:
    """Cancel a visible job (the API and the dashboard): its status afterwards, or a 409 if it had finished."""
    try:
        status = transitions.request_cancel(g.db, job_id)
    except transitions.TransitionError as exc:
        g.db.rollback()
        raise ApiError(409, f"The job cannot be canceled: {exc}.") from None
    g.db.commit()
    if status is JobStatus.CANCELED:  # a queued job: if it had been sent, its slot is free for the next one
        queue = g.db.execute(select(Job.queue).where(Job.id == job_id)).scalar_one()
        dispatch_soon(queue)
    return status
