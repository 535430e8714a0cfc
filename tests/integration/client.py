"""Calls the tests make: the API through Flask's test client, and reads of the job timeline."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from typing import Any

PROBLEM_JSON = "application/problem+json"
FINISHED = ("succeeded", "failed", "canceled")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(client: Any, key: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    """POST /v1/jobs; returns the response (the caller checks its status)."""
    return client.post("/v1/jobs", json=body, headers={**auth(key), **(headers or {})})


def diagnostic(client: Any, key: str, headers: dict[str, str] | None = None, **params: Any) -> dict[str, Any]:
    """Submit a diagnostic job with ``params`` as its input; returns the Job (asserting 202)."""
    response = submit(client, key, {"type": "diagnostic", "input": params}, headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()


def get_job(client: Any, key: str, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}", headers=auth(key))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def wait_for(
    client: Any,
    key: str,
    job_id: str,
    statuses: Iterable[str] = FINISHED,
    timeout: float = 30.0,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Poll the job until its status is one of ``statuses`` (and ``until(job)`` holds, if given)."""
    wanted = {statuses} if isinstance(statuses, str) else set(statuses)
    deadline = time.monotonic() + timeout
    job = get_job(client, key, job_id)
    while time.monotonic() < deadline:
        if job["status"] in wanted and (until is None or until(job)):
            return job
        time.sleep(0.05)
        job = get_job(client, key, job_id)
    raise AssertionError(f"job {job_id} did not reach {sorted(wanted)} within {timeout:g}s; it is now: {job}")


def events(job_id: str, database_url: str | None = None) -> list[dict[str, Any]]:
    """The job's timeline as recorded in ``job_events``, oldest first."""
    from sqlalchemy import select

    from db.models import JobEvent
    from db.session import session_scope

    with session_scope(database_url) as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        return [
            {"kind": row.kind, "attempt": row.attempt, "message": row.message, "data": row.data, "at": row.at}
            for row in rows
        ]


def kinds(job_id: str, database_url: str | None = None) -> list[str]:
    return [event["kind"] for event in events(job_id, database_url)]


def assert_problem(response: Any, status: int, loc: Iterable[Any] | None = None) -> dict[str, Any]:
    """The answer is RFC 9457 problem+json with ``status``; with ``loc``, an error names that field."""
    text = response.get_data(as_text=True) if hasattr(response, "get_data") else response.text
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {text}"
    assert response.headers["Content-Type"].startswith(PROBLEM_JSON), response.headers["Content-Type"]
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    for member in ("type", "title", "status", "detail"):
        assert member in body, f"problem without {member!r}: {body}"
    assert body["status"] == status
    assert isinstance(body["detail"], str) and body["detail"], body
    if loc is not None:
        wanted = list(loc)
        assert body.get("errors"), f"no `errors` in {body}"
        locs = [list(error["loc"]) for error in body["errors"]]
        assert all(isinstance(error.get("msg"), str) and error["msg"] for error in body["errors"]), body
        assert any(found[-len(wanted) :] == wanted for found in locs), f"no error at {wanted}; errors: {body['errors']}"
    return body


def png_bytes(width: int = 8, height: int = 6, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, fmt)
    return buffer.getvalue()


def upload(client: Any, key: str, data: bytes, filename: str = "in.png", **form: str) -> Any:
    """POST /v1/files with ``data`` in the multipart field ``file``."""
    return client.post(
        "/v1/files",
        data={"file": (io.BytesIO(data), filename), **form},
        headers=auth(key),
        content_type="multipart/form-data",
    )
