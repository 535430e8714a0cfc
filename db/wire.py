"""How a job looks on the wire (docs/api.md ``Job``): the API's answers and the webhook body share it.

It lives in ``db/`` because the state machine snapshots the job into a webhook delivery in the
same transaction as the event, and the webhook worker (which may not import ``api``) sends it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from db.models import Job, JobStatus, Model
from db.storage import Storage, get_storage


def rfc3339(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def with_artifact_urls(value: Any, artifacts: dict[str, str | None], storage: Storage | None = None) -> Any:
    """Add a fresh presigned ``url`` and ``expired`` to every artifact found in a job's output.

    ``artifacts``: name → storage key, or None for an artifact that retention expired (its object is gone:
    ``"url": null, "expired": true``, and no URL is signed)."""
    if isinstance(value, dict):
        if value.get("name") in artifacts and {"content_type", "size", "sha256"} <= value.keys():
            key = artifacts[value["name"]]
            if key is None:
                return {**value, "url": None, "expired": True}
            return {**value, "url": (storage or get_storage()).presigned_url(key), "expired": False}
        return {k: with_artifact_urls(v, artifacts, storage) for k, v in value.items()}
    if isinstance(value, list):
        return [with_artifact_urls(v, artifacts, storage) for v in value]
    return value


def artifact_keys(artifacts: Iterable[Any]) -> dict[str, str | None]:
    """name → storage key of a job's artifacts (None for an expired one), as ``with_artifact_urls`` takes them.

    ``artifacts``: ``Artifact`` rows, or result rows with their ``name``, ``storage_key`` and ``expired_at``."""
    return {a.name: None if a.expired_at is not None else a.storage_key for a in artifacts}


def outputs_expired_at(artifacts: Iterable[Any]) -> datetime | None:
    """When retention expired the job's outputs (the latest of its artifacts' expiries), else None."""
    return max((a.expired_at for a in artifacts if a.expired_at is not None), default=None)


def job_json(job: Job, *, urls: bool = True, storage: Storage | None = None) -> dict[str, Any]:
    """The Job; ``urls=False`` leaves out the presigned artifact URLs (for a snapshot kept in the database).

    ``retry_of`` names the job this one retries and ``retried_as`` the jobs made by retrying it (oldest first).
    URLs are presigned by ``storage`` (the process's default storage if not given). An expired artifact
    has ``"url": null, "expired": true``, and ``outputs_expired_at`` says when.
    """
    progress = {"step": 0, "total": None, "fraction": 0.0, "message": None, **(job.progress or {})}
    output, expired_at = job.output, None
    if urls and output is not None and job.status == JobStatus.SUCCEEDED.value:
        # Only a succeeded job has artifacts: any other status costs no artifact query.
        output = with_artifact_urls(output, artifact_keys(job.artifacts), storage)
        expired_at = outputs_expired_at(job.artifacts)
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
        "priority": job.priority,
        "created_at": rfc3339(job.created_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
        "metrics": {
            "queue_seconds": _seconds(job.created_at, job.started_at),
            "run_seconds": _seconds(job.started_at, job.finished_at),
        },
        "webhook": job.webhook,
        "webhook_events_filter": job.webhook_events_filter,
        "outputs_expired_at": rfc3339(expired_at),
        "retry_of": job.retry_of,
        "retried_as": [retry.id for retry in job.retries],
        "urls": {
            "self": f"/v1/jobs/{job.id}",
            "cancel": f"/v1/jobs/{job.id}/cancel",
            "retry": f"/v1/jobs/{job.id}/retry",
        },
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
