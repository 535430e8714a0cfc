"""How a job looks on the wire (docs/api.md ``Job``): the API's answers and the webhook body share it.

It lives in ``db/`` because the state machine snapshots the job into a webhook delivery in the
same transaction as the event, and the webhook worker (which may not import ``api``) sends it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from db.models import Job, JobStatus, Model
from db.storage import Storage, get_storage


def rfc3339(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def with_artifact_urls(value: Any, artifacts: dict[str, str], storage: Storage | None = None) -> Any:
    """Add a fresh presigned ``url`` to every artifact found in a job's output (``artifacts``: name → key)."""
    if isinstance(value, dict):
        if value.get("name") in artifacts and {"content_type", "size", "sha256"} <= value.keys():
            return {**value, "url": (storage or get_storage()).presigned_url(artifacts[value["name"]])}
        return {k: with_artifact_urls(v, artifacts, storage) for k, v in value.items()}
    if isinstance(value, list):
        return [with_artifact_urls(v, artifacts, storage) for v in value]
    return value


def job_json(job: Job, *, urls: bool = True, storage: Storage | None = None) -> dict[str, Any]:
    """The Job; ``urls=False`` leaves out the presigned artifact URLs (for a snapshot kept in the database).

    URLs are presigned by ``storage`` (the process's default storage if not given).
    """
    progress = {"step": 0, "total": None, "fraction": 0.0, "message": None, **(job.progress or {})}
    output = job.output
    if urls and output is not None and job.status == JobStatus.SUCCEEDED.value:
        output = with_artifact_urls(output, {a.name: a.storage_key for a in job.artifacts}, storage)
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


LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def model_json(model: Model, *, urls: bool = True, storage: Storage | None = None) -> dict[str, Any]:
    """A fine-tuned ``Model`` (docs/api.md); ``urls=False`` leaves out the presigned weights URL."""
    weights: dict[str, Any] = {
        "name": LORA_WEIGHTS_NAME,
        "content_type": "application/octet-stream",
        "size": model.size,
        "sha256": model.sha256,
    }
    if urls:
        weights["url"] = (storage or get_storage()).presigned_url(model.storage_key, LORA_WEIGHTS_NAME)
    return {
        "id": model.id,
        "name": model.name,
        "kind": model.kind,
        "base_model": model.base_model,
        "created_at": rfc3339(model.created_at),
        "job_id": model.job_id,
        "weights": weights,
        "details": model.details or {},
        "urls": {"self": f"/v1/models/{model.id}"},
    }
