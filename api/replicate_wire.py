"""How gpujobs resources look on the Replicate-compatible surface (``api.replicate``; docs/api.md, "Replicate").

The official ``replicate`` Python client parses these shapes with pydantic: a prediction needs ``id``,
``model``, ``version`` and ``status``; a training also ``version``; a file ``id``, ``name``,
``content_type``, ``size``, ``etag``, ``checksums``, ``metadata``, ``created_at`` and ``urls``. Anything
more of ours (a job's ``type``, ``progress``) is left out: a Replicate client has no use for it.

- **Status**: queued → ``starting``, running → ``processing``; the finished ones keep their names.
- **Output**: the job's output with every artifact replaced by its presigned URL, which the client turns
  into a ``FileOutput`` (an expired artifact becomes ``null``).
- **Logs**: one line per timeline event, and while the job runs a tqdm-style progress line
  (`` 40%|████      | 4/10``) that the client's ``Prediction.progress`` parses.
- **URLs**: absolute (the client follows ``urls.stream`` as given), under the server's ``/replicate/v1``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from flask import g, request
from sqlalchemy import select

from db.models import File, Job, JobEvent, JobStatus
from db.wire import artifact_keys, rfc3339, with_artifact_urls

OWNER = "gpujobs"  # the one model owner: models are `gpujobs/<job type>`
COG_VERSION = "0.9.0"  # what the client's schema helpers compare against (iterator outputs came in 0.3.9)
LOG_LINES = 200  # the newest lines of a job's timeline that `logs` shows
BAR = 10  # the width of the progress line's bar

STATUS = {
    JobStatus.QUEUED.value: "starting",
    JobStatus.RUNNING.value: "processing",
    JobStatus.SUCCEEDED.value: "succeeded",
    JobStatus.FAILED.value: "failed",
    JobStatus.CANCELED.value: "canceled",
}


def base_url() -> str:
    """``<scheme>://<host>/replicate/v1``: the root the client was given (``base_url=<server>/replicate``)."""
    return f"{request.host_url}replicate/v1"


def model_ref(job_type: str) -> str:
    return f"{OWNER}/{job_type}"


def urls_of(kind: str, ident: str) -> dict[str, str]:
    """``get``, ``cancel`` and (predictions) ``stream``: absolute URLs of a prediction or a training."""
    root = f"{base_url()}/{kind}/{ident}"
    urls = {"get": root, "cancel": f"{root}/cancel"}
    if kind == "predictions":
        urls["stream"] = f"{root}/stream"
    return urls


def output_urls(value: Any) -> Any:
    """A job output (its artifacts already carry a presigned ``url``) with every artifact replaced by its URL."""
    if isinstance(value, dict):
        if {"name", "content_type", "size", "sha256", "url"} <= value.keys():
            return value["url"]
        return {k: output_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [output_urls(v) for v in value]
    return value


def file_urls(value: Any) -> list[str]:
    """Every artifact URL of a presented output, in order (what a stream sends as ``output`` events)."""
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return [value]
    if isinstance(value, dict):
        return [url for v in value.values() for url in file_urls(v)]
    if isinstance(value, list):
        return [url for v in value for url in file_urls(v)]
    return []


def output_of(job: Job) -> Any:
    """The job's output as a prediction shows it: artifacts as presigned URLs (only a succeeded job has any)."""
    if job.output is None or job.status != JobStatus.SUCCEEDED.value:
        return job.output
    return output_urls(with_artifact_urls(job.output, artifact_keys(job.artifacts)))


def log_line(event: JobEvent) -> str:
    message = f": {event.message}" if event.message else ""
    return f"{rfc3339(event.at)} {event.kind}{message}"


def progress_line(progress: dict[str, Any] | None) -> str | None:
    """The saved progress as a tqdm line, the form the client's ``Prediction.Progress.parse`` reads."""
    step, total = (progress or {}).get("step"), (progress or {}).get("total")
    if not isinstance(step, int) or not isinstance(total, int) or total <= 0:
        return None
    step = min(max(step, 0), total)
    filled = BAR * step // total
    bar = "█" * filled + " " * (BAR - filled)
    message = (progress or {}).get("message")
    return f"{100 * step // total:3d}%|{bar}| {step}/{total}" + (f" {message}" if message else "")


def logs_of(job: Job, events: list[JobEvent]) -> str:
    lines = [log_line(event) for event in events[-LOG_LINES:]]
    if job.status == JobStatus.RUNNING.value:
        line = progress_line(job.progress)
        if line:
            lines.append(line)
    return "\n".join(lines)


def events_of(job_ids: Iterable[str]) -> dict[str, list[JobEvent]]:
    """The timeline of each job (one query for a page of them), oldest first."""
    found: dict[str, list[JobEvent]] = defaultdict(list)
    ids = list(job_ids)
    if ids:
        for event in g.db.scalars(select(JobEvent).where(JobEvent.job_id.in_(ids)).order_by(JobEvent.id)):
            found[event.job_id].append(event)
    return found


def error_of(job: Job) -> str | None:
    if not job.error:
        return None
    code, message = job.error.get("code"), job.error.get("message")
    return f"{message} ({code})" if code and message else str(message or code)


def prediction_json(job: Job, events: list[JobEvent], status: str | None = None) -> dict[str, Any]:
    """A job as a Replicate prediction. ``status`` overrides the mapped one (see ``api.replicate``'s waits)."""
    run_seconds = (job.finished_at - job.started_at).total_seconds() if job.started_at and job.finished_at else None
    total_seconds = (job.finished_at - job.created_at).total_seconds() if job.finished_at else None
    metrics: dict[str, Any] = {}
    if run_seconds is not None:
        metrics["predict_time"] = round(run_seconds, 3)
    if total_seconds is not None:
        metrics["total_time"] = round(total_seconds, 3)
    return {
        "id": job.id,
        "model": model_ref(job.type),
        "version": job.type,
        "status": status or STATUS[job.status],
        "input": job.input,
        "output": output_of(job),
        "logs": logs_of(job, events),
        "error": error_of(job),
        "metrics": metrics,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "completed_at": rfc3339(job.finished_at),
        "source": "api",
        "webhook": job.webhook,
        "webhook_events_filter": job.webhook_events_filter,
        "urls": urls_of("predictions", job.id),
    }


def training_json(job: Job, events: list[JobEvent]) -> dict[str, Any]:
    """A ``finetune`` job as a Replicate training; ``destination`` is what the create named (kept in its metadata)."""
    body = prediction_json(job, events)
    body["destination"] = (job.meta or {}).get("replicate_destination")
    body["urls"] = urls_of("trainings", job.id)
    return body


def file_json(file: File) -> dict[str, Any]:
    """A stored input as a Replicate file; ``urls.get`` is what a prediction's input takes to name it."""
    return {
        "id": file.id,
        "name": file.filename,
        "content_type": file.content_type,
        "size": file.size,
        "etag": file.sha256,
        "checksums": {"sha256": file.sha256},
        "metadata": {},
        "created_at": rfc3339(file.created_at),
        "expires_at": None,
        "urls": {"get": f"{base_url()}/files/{file.id}"},
    }


def version_json(job_type: str, input_schema: dict[str, Any], created_at: str) -> dict[str, Any]:
    """A job type as the model version the client fetches (``run("gpujobs/<type>:<version>")``), with Cog's
    ``Input`` and ``Output`` schemas (the output is an object, never an iterator)."""
    return {
        "id": job_type,
        "created_at": created_at,
        "cog_version": COG_VERSION,
        "openapi_schema": {
            "openapi": "3.1.0",
            "info": {"title": model_ref(job_type), "version": job_type},
            "paths": {},
            "components": {"schemas": {"Input": input_schema, "Output": {"type": "object", "title": "Output"}}},
        },
    }


def model_json(job_type: str, description: str, version: dict[str, Any]) -> dict[str, Any]:
    return {
        "url": f"{base_url()}/models/{model_ref(job_type)}",
        "owner": OWNER,
        "name": job_type,
        "description": description,
        "visibility": "private",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": version,
    }
