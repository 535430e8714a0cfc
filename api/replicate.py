"""``/replicate/v1``: a Replicate-compatible surface, so that the official ``replicate`` Python client works
unchanged with ``replicate.Client(api_token=<gpujobs key>, base_url="<server>/replicate")`` (docs/api.md,
"Replicate-compatible endpoint").

Models are ``gpujobs/<job type>``; a model's one version is named after its job type, so ``version`` in
``POST /predictions`` is ``segmentation``, ``gpujobs/segmentation`` or ``gpujobs/segmentation:segmentation``.
Trainings run ``finetune`` (``gpujobs/finetune``). Every submit goes through ``api.jobs.submit``, the path
of ``POST /v1/jobs`` (validation, quotas, idempotency, priority, dispatch): a prediction *is* a job, and
each can be read through either surface. Errors are our problem+json, whose ``type``, ``title``, ``status``
and ``detail`` are the RFC 7807 fields the client's ``ReplicateError`` reads.

None of these routes carries ``@document``: they stay out of ``/openapi.json``, which describes ``/v1``.
"""

from __future__ import annotations

import io
import re
import zipfile
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import joinedload, selectinload

from api import config, replicate_stream
from api.auth import current_key, is_admin
from api.body import json_object
from api.errors import ApiError, from_pydantic, validation_error
from api.files import load_file, save_file
from api.jobs import JobCreate, WebhookEvent, _prefer_wait, request_cancel, submit
from api.presenters import ID, page_params, paginate
from api.replicate_wire import (
    OWNER,
    STATUS,
    base_url,
    events_of,
    file_json,
    model_json,
    prediction_json,
    training_json,
    version_json,
)
from db.models import File, Job
from db.wire import rfc3339
from worker.jobs import job_types
from worker.jobs.spec import JobType

bp = Blueprint("replicate", __name__, url_prefix="/replicate/v1")

TRAINING_TYPE = "finetune"
STARTED = rfc3339(datetime.now(UTC)) or ""  # a version's `created_at`: a job type's version is this process's
# Replicate's webhook events → ours. Our outputs arrive all at once, with the job's completion.
EVENTS: dict[str, list[WebhookEvent]] = {
    "start": ["start"],
    "output": ["completed"],
    "logs": ["progress"],
    "completed": ["completed"],
}
BARE_WAIT_SECONDS = 55
DEFAULT_EVENTS = ["output", "completed"]  # Replicate's default: new outputs and completion
VERSION = re.compile(rf"^(?:{OWNER}/)?(?P<type>[a-z0-9_]{{1,64}})(?::(?P<version>[A-Za-z0-9_.-]{{1,64}}))?$")


class PredictionCreate(BaseModel):
    """The body of ``POST /predictions`` (``version`` required) and ``/models/{owner}/{name}/predictions``."""

    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(None, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)
    webhook: str | None = Field(None, max_length=2048)
    webhook_completed: str | None = Field(None, max_length=2048)
    webhook_events_filter: list[str] | None = Field(None, max_length=4)
    stream: bool | None = None  # every prediction streams; accepted for the client's `stream()`
    destination: str | None = Field(None, max_length=200)  # trainings only


# --- helpers --------------------------------------------------------------------------------------------


def _body() -> PredictionCreate:
    try:
        return PredictionCreate.model_validate(json_object())
    except ValidationError as exc:
        raise from_pydantic(exc, ["body"]) from None


def _served(name: str) -> JobType | None:
    job_type = job_types(config.settings()).get(name)
    return None if job_type is None or (job_type.admin_only and not is_admin()) else job_type


def _known() -> str:
    names = sorted(n for n, t in job_types(config.settings()).items() if is_admin() or not t.admin_only)
    return ", ".join(f"{OWNER}/{n}" for n in names)


def _model(owner: str, name: str) -> JobType:
    """The job type a model path names, or a 404 naming the models there are."""
    job_type = _served(name) if owner == OWNER else None
    if job_type is None:
        raise ApiError(404, f"No model {owner}/{name}; the models here are {_known()}.")
    return job_type


def _type_of_version(version: str | None) -> str:
    """The job type ``version`` names (``type``, ``gpujobs/type`` or ``gpujobs/type:type``), else 422."""
    if version is None:
        raise validation_error(["body", "version"], f"is required: a model version, one of {_known()}")
    match = VERSION.match(version)
    name = match.group("type") if match else None
    if match is None or name is None or _served(name) is None or match.group("version") not in (None, name):
        raise validation_error(["body", "version"], f"no version {version!r}; the versions here are {_known()}")
    return name


def _own_files(value: Any, prefix: str) -> Any:
    """``value`` with each URL of one of our files (``<prefix><file id>``, what ``POST /files`` returned as
    ``urls.get``) replaced by the file's id. Other URLs and data URIs pass through to the submit as they are."""
    if isinstance(value, str) and value.startswith(prefix) and ID.fullmatch(value[len(prefix) :]):
        return value[len(prefix) :]
    if isinstance(value, dict):
        return {k: _own_files(v, prefix) for k, v in value.items()}
    if isinstance(value, list):
        return [_own_files(v, prefix) for v in value]
    return value


def _webhook(body: PredictionCreate) -> tuple[str | None, list[WebhookEvent]]:
    """Replicate's ``webhook``, ``webhook_completed`` and ``webhook_events_filter`` as our webhook and filter."""
    url, events = body.webhook, body.webhook_events_filter
    if body.webhook_completed is not None:
        if url is not None and url != body.webhook_completed:
            raise validation_error(
                ["body", "webhook_completed"], "a job has one webhook URL: give `webhook` or `webhook_completed`"
            )
        if url is None:
            url, events = body.webhook_completed, events or ["completed"]
    ours: list[WebhookEvent] = []
    for index, event in enumerate(events if events is not None else DEFAULT_EVENTS):
        if event not in EVENTS:
            raise validation_error(
                ["body", "webhook_events_filter", index], f"must be one of {', '.join(EVENTS)}, not {event!r}"
            )
        ours += [e for e in EVENTS[event] if e not in ours]
    return url, ours


def _wait() -> float | None:
    """``Prefer: wait=N``, or the client's bare ``Prefer: wait``: ``BARE_WAIT_SECONDS`` (at most the configured
    limit), inside the 60.5 s read timeout the client sets for it."""
    tokens = [t.strip().lower() for t in request.headers.get("Prefer", "").split(",")]
    if "wait" in tokens:
        return float(min(BARE_WAIT_SECONDS, config.settings().max_wait_seconds))
    return _prefer_wait()


def _create(job_type: str, body: PredictionCreate, metadata: dict[str, Any] | None = None) -> tuple[Job, int, bool]:
    """Submit through ``POST /v1/jobs``'s own path. Returns the job, 201 (new) or 200 (an idempotent repeat),
    and whether it was still unfinished after a ``Prefer: wait``."""
    url, events = _webhook(body)
    try:
        spec = JobCreate(
            type=job_type,
            input=_own_files(body.input, f"{base_url()}/files/"),
            webhook=url,
            webhook_events_filter=events,
            metadata=metadata or {},
        )
    except ValidationError as exc:  # the webhook URL: checked by our own model
        raise from_pydantic(exc, ["body"]) from None
    wait = _wait()
    job, status = submit(spec, {"replicate": body.model_dump(mode="json"), "type": job_type}, wait)
    return job, 201 if status == 202 else 200, bool(wait) and STATUS[job.status] in ("starting", "processing")


def _answer(
    job: Job, status: int, waited_unfinished: bool, training: bool = False
) -> tuple[Response, int, dict[str, str]]:
    events = events_of([job.id])[job.id]
    if training:
        body = training_json(job, events)
    else:
        # After a `Prefer: wait` that ran out, Replicate answers `starting`; the client's `run()` takes any
        # other status as final (it would return a running job's empty output), and polls after `starting`.
        body = prediction_json(job, events, "starting" if waited_unfinished else None)
    return jsonify(body), status, {"Location": body["urls"]["get"]}


def _load(job_id: str) -> Job:
    query = select(Job).where(Job.id == job_id).options(joinedload(Job.artifacts))
    if not is_admin():
        query = query.where(Job.tenant_id == current_key().tenant_id)
    job: Job | None = g.db.scalars(query.execution_options(populate_existing=True)).unique().one_or_none()
    if job is None:
        raise ApiError(404, f"No prediction {job_id!r}.")
    return job


def _list(kind: str) -> Response:
    """A page of the caller's tenant's jobs (an admin's too: Replicate's lists are "yours"), newest first:
    ``results``, and ``next`` as the absolute URL of the next page (``previous``: null)."""
    limit, cursor = page_params()
    query = select(Job).options(selectinload(Job.artifacts)).where(Job.tenant_id == current_key().tenant_id)
    query = query.where(Job.type == TRAINING_TYPE) if kind == "trainings" else query.where(Job.type != TRAINING_TYPE)
    jobs, next_cursor = paginate(query, Job, limit, cursor)
    events = events_of(job.id for job in jobs)
    present = training_json if kind == "trainings" else prediction_json
    results = [present(job, events[job.id]) for job in jobs]
    following = f"{base_url()}/{kind}?cursor={next_cursor}&limit={limit}" if next_cursor else None
    return jsonify({"previous": None, "next": following, "results": results})


def _cancel(job_id: str, training: bool) -> tuple[Response, int, dict[str, str]]:
    """Cancel a job; a finished one is answered as it is (Replicate's cancel of a finished prediction is no error)."""
    job = _load(job_id)
    if STATUS[job.status] not in ("succeeded", "failed", "canceled"):
        request_cancel(job_id)
        g.db.expire_all()
        job = _load(job_id)
    return _answer(job, 200, False, training)


# --- predictions ----------------------------------------------------------------------------------------


@bp.post("/predictions")
def create_prediction() -> tuple[Response, int, dict[str, str]]:
    body = _body()
    job_type = _type_of_version(body.version)
    if body.destination is not None:
        raise validation_error(["body", "destination"], "only a training takes a destination")
    return _answer(*_create(job_type, body))


@bp.post("/models/<owner>/<name>/predictions")
def create_model_prediction(owner: str, name: str) -> tuple[Response, int, dict[str, str]]:
    job_type = _model(owner, name)
    body = _body()
    if body.version is not None:
        raise validation_error(["body", "version"], "the model path names the version: leave `version` out")
    if body.destination is not None:
        raise validation_error(["body", "destination"], "only a training takes a destination")
    return _answer(*_create(job_type.name, body))


@bp.get("/predictions")
def list_predictions() -> Response:
    return _list("predictions")


@bp.get("/predictions/<job_id>")
def get_prediction(job_id: str) -> tuple[Response, int, dict[str, str]]:
    return _answer(_load(job_id), 200, False)


@bp.post("/predictions/<job_id>/cancel")
def cancel_prediction(job_id: str) -> tuple[Response, int, dict[str, str]]:
    return _cancel(job_id, training=False)


@bp.get("/predictions/<job_id>/stream")
def stream_prediction(job_id: str) -> Response:
    job = _load(job_id)
    key = current_key()
    return replicate_stream.response(job.id, None if is_admin() else key.tenant_id, key.id, key.tenant_id)


# --- trainings ------------------------------------------------------------------------------------------


def _create_training(body: PredictionCreate) -> tuple[Response, int, dict[str, str]]:
    """A ``finetune`` job; ``destination`` (``owner/name``) names the LoRA when the input has no ``name``."""
    if body.destination is None:
        raise validation_error(["body", "destination"], "is required: the model to make, as `owner/name`")
    owner, _, name = body.destination.partition("/")
    if not owner or not name or "/" in name:
        raise validation_error(["body", "destination"], "must be `owner/name`")
    if "name" not in body.input:
        body.input["name"] = name
    job, status, _ = _create(TRAINING_TYPE, body, {"replicate_destination": body.destination})
    return _answer(job, status, False, training=True)


@bp.post("/trainings")
def create_training() -> tuple[Response, int, dict[str, str]]:
    body = _body()
    if _type_of_version(body.version or f"{OWNER}/{TRAINING_TYPE}") != TRAINING_TYPE:
        raise validation_error(["body", "version"], f"trainings run {OWNER}/{TRAINING_TYPE}")
    return _create_training(body)


@bp.post("/models/<owner>/<name>/versions/<version_id>/trainings")
def create_model_training(owner: str, name: str, version_id: str) -> tuple[Response, int, dict[str, str]]:
    if _model(owner, name).name != TRAINING_TYPE or version_id != name:
        raise ApiError(404, f"No trainable version {owner}/{name}:{version_id}; trainings run {OWNER}/{TRAINING_TYPE}.")
    body = _body()
    if body.version is not None:
        raise validation_error(["body", "version"], "the path names the version: leave `version` out")
    return _create_training(body)


@bp.get("/trainings")
def list_trainings() -> Response:
    return _list("trainings")


@bp.get("/trainings/<job_id>")
def get_training(job_id: str) -> tuple[Response, int, dict[str, str]]:
    return _answer(_load(job_id), 200, False, training=True)


@bp.post("/trainings/<job_id>/cancel")
def cancel_training(job_id: str) -> tuple[Response, int, dict[str, str]]:
    return _cancel(job_id, training=True)


# --- models ---------------------------------------------------------------------------------------------


def _version(job_type: JobType) -> dict[str, Any]:
    schema = job_type.Input.model_json_schema()
    schema["title"] = "Input"
    return version_json(job_type.name, schema, STARTED)


@bp.get("/models/<owner>/<name>")
def get_model(owner: str, name: str) -> Response:
    job_type = _model(owner, name)
    return jsonify(model_json(job_type.name, job_type.summary, _version(job_type)))


@bp.get("/models/<owner>/<name>/versions")
def list_versions(owner: str, name: str) -> Response:
    return jsonify({"previous": None, "next": None, "results": [_version(_model(owner, name))]})


@bp.get("/models/<owner>/<name>/versions/<version_id>")
def get_version(owner: str, name: str, version_id: str) -> Response:
    job_type = _model(owner, name)
    if version_id != job_type.name:
        raise ApiError(404, f"No version {version_id!r} of {owner}/{name}; its one version is {job_type.name!r}.")
    return jsonify(_version(job_type))


# --- files ----------------------------------------------------------------------------------------------


@bp.post("/files")
def create_file() -> tuple[Response, int, dict[str, str]]:
    """The client's upload (``files.create``, and ``run()`` given a file object): multipart field ``content``.
    A zip is kept as a dataset (a fine-tune's), anything else must be an image, as ``POST /v1/files`` checks."""
    if not (request.mimetype or "").startswith("multipart/form-data"):
        raise ApiError(415, "Upload with `Content-Type: multipart/form-data` and the file in the `content` field.")
    upload = request.files.get("content")
    if upload is None:
        raise validation_error(["body", "content"], "is required (a multipart field named `content`)")
    data = upload.read()
    if not data:
        raise validation_error(["body", "content"], "is empty")
    purpose = "dataset" if zipfile.is_zipfile(io.BytesIO(data)) else "input"
    row = save_file(data, upload.filename, purpose, loc=("body", "content"))
    body = file_json(row)
    return jsonify(body), 201, {"Location": body["urls"]["get"]}


@bp.get("/files/<file_id>")
def get_file(file_id: str) -> Response:
    return jsonify(file_json(load_file(file_id)))


@bp.get("/files")
def list_files() -> Response:
    """The caller's tenant's files, newest first (the client reads ``results``)."""
    limit, cursor = page_params()
    query = select(File).where(File.tenant_id == current_key().tenant_id)
    files, next_cursor = paginate(query, File, limit, cursor)
    following = f"{base_url()}/files?cursor={next_cursor}&limit={limit}" if next_cursor else None
    return jsonify({"previous": None, "next": following, "results": [file_json(f) for f in files]})
