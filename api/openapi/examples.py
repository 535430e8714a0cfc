"""Examples shown beside request and response bodies (Swagger UI fills "Try it out" with the first one).

``tests/unit/test_openapi.py`` validates every example against the schema it illustrates, so they
cannot drift from the document.
"""

from __future__ import annotations

from typing import Any

ARTIFACT = {
    "name": "diagnostic.txt",
    "content_type": "text/plain",
    "size": 42,
    "sha256": "3f2a6c1e8b0d4f5a9c7e2b1d0a8f6e4c2b0d9f7e5c3a1b8d6f4e2c0a9b7d5f3e",
    "url": "http://127.0.0.1:8333/gpujobs/jobs/job_4mQ2x8Lr/diagnostic.txt?X-Amz-Signature=…",
    "expired": False,
}

_JOB_COMMON = {
    "metadata": {"batch": "nightly"},
    "error": None,
    "attempts": 1,
    "priority": 5,
    "created_at": "2026-12-02T07:00:00Z",
    "webhook": None,
    "webhook_events_filter": ["completed"],
    "outputs_expired_at": None,
    "retry_of": None,
    "retried_as": [],
}


def _urls(job_id: str) -> dict[str, str]:
    return {
        "self": f"/v1/jobs/{job_id}",
        "cancel": f"/v1/jobs/{job_id}/cancel",
        "retry": f"/v1/jobs/{job_id}/retry",
    }


DIAGNOSTIC_SUCCEEDED: dict[str, Any] = {
    "id": "job_4mQ2x8Lr",
    "type": "diagnostic",
    "status": "succeeded",
    "input": {"sleep_seconds": 0, "steps": 3, "fail": False},
    "output": {"steps": 3, "artifact": ARTIFACT},
    "progress": {"step": 3, "total": 3, "fraction": 1.0, "message": None},
    "started_at": "2026-12-02T07:00:00.120Z",
    "finished_at": "2026-12-02T07:00:00.480Z",
    "metrics": {"queue_seconds": 0.12, "run_seconds": 0.36},
    "urls": _urls("job_4mQ2x8Lr"),
    **_JOB_COMMON,
}

TEXT_TO_IMAGE_QUEUED: dict[str, Any] = {
    "id": "job_Zt7c1Pq0",
    "type": "text_to_image",
    "status": "queued",
    "input": {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "",
        "width": 512,
        "height": 512,
        "num_inference_steps": 25,
        "guidance_scale": 7.5,
        "scheduler": "euler",
        "seed": 7,
        "num_outputs": 1,
        "loras": [],
        "model": None,
        "output_format": "png",
        "output_quality": None,
    },
    "output": None,
    "progress": {"step": 0, "total": None, "fraction": 0.0, "message": None},
    "started_at": None,
    "finished_at": None,
    "metrics": {"queue_seconds": None, "run_seconds": None},
    "urls": _urls("job_Zt7c1Pq0"),
    **{**_JOB_COMMON, "attempts": 0},
}

JOB_CREATE = {
    "text_to_image": {
        "summary": "Generate an image",
        "value": {"type": "text_to_image", "input": {"prompt": "a lighthouse at dusk", "seed": 7}},
    },
    "segmentation": {
        "summary": "Segment an uploaded image",
        "value": {"type": "segmentation", "input": {"image": "file_8fJ2kQ1a", "threshold": 0.6}},
    },
    "diagnostic": {
        "summary": "Exercise the whole loop without a model (admin keys)",
        "value": {
            "type": "diagnostic",
            "input": {"steps": 3},
            "metadata": {"batch": "nightly"},
            "webhook": "https://example.com/hook",
            "webhook_events_filter": ["completed"],
        },
    },
}

FILE = {
    "id": "file_8fJ2kQ1a",
    "filename": "street.png",
    "purpose": "input",
    "content_type": "image/png",
    "size": 48213,
    "sha256": "9b1c3e5a7d2f4b6c8e0a1d3f5b7c9e2a4d6f8b0c1e3a5d7f9b2c4e6a8d0f1b3c",
    "width": 640,
    "height": 480,
    "created_at": "2026-12-02T06:59:58Z",
    "urls": {"self": "/v1/files/file_8fJ2kQ1a", "content": "/v1/files/file_8fJ2kQ1a/content"},
}

KEY_CREATE = {
    "user": {"summary": "A user key with a tenant of its own", "value": {"name": "ci pipeline", "role": "user"}}
}

CREATED_KEY = {
    "id": "key_Qw3e5R7t",
    "name": "ci pipeline",
    "role": "user",
    "tenant": "ten_Hb2n4M6k",
    "created_at": "2026-12-02T07:00:00Z",
    "revoked_at": None,
    "key": "gpj_…",
}

PROBLEM_422 = {
    "type": "about:blank",
    "title": "Unprocessable Content",
    "status": 422,
    "detail": "The request is invalid.",
    "errors": [{"loc": ["body", "input", "prompt"], "msg": "Field required"}],
}

# (path, method) → status → media-type examples (name → {summary, value}).
RESPONSES: dict[tuple[str, str], dict[int, dict[str, Any]]] = {
    ("/v1/jobs", "post"): {
        202: {"queued": {"summary": "Accepted, queued", "value": TEXT_TO_IMAGE_QUEUED}},
        200: {"repeat": {"summary": "The same Idempotency-Key and body again", "value": DIAGNOSTIC_SUCCEEDED}},
    },
    ("/v1/jobs/{job_id}", "get"): {200: {"succeeded": {"summary": "A finished job", "value": DIAGNOSTIC_SUCCEEDED}}},
    ("/v1/jobs", "get"): {
        200: {"page": {"summary": "One page", "value": {"items": [DIAGNOSTIC_SUCCEEDED], "next_cursor": None}}}
    },
    ("/v1/files", "post"): {201: {"image": {"summary": "An uploaded image", "value": FILE}}},
    ("/v1/files/{file_id}", "get"): {200: {"image": {"summary": "An uploaded image", "value": FILE}}},
    ("/v1/keys", "post"): {201: {"user": {"summary": "Shown this once", "value": CREATED_KEY}}},
}
REQUESTS: dict[tuple[str, str], dict[str, Any]] = {("/v1/jobs", "post"): JOB_CREATE, ("/v1/keys", "post"): KEY_CREATE}
