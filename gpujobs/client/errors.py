"""The SDK's exceptions: every problem+json answer becomes a typed exception, so callers catch what they mean.

All derive from ``GpujobsError``, which carries the problem's ``status``, ``type``, ``title`` and ``detail``
(docs/api.md, "Conventions"). ``BadRequest`` is every 4xx that says the request itself was wrong (400, 413, 414,
415, 422…); ``ValidationError`` (422) adds the ``errors`` list naming each bad field. ``RateLimited`` and
``ServiceUnavailable`` carry ``retry_after``: the client retries them itself (bounded) before raising.
``JobFailed`` is not an HTTP error: the job ran and failed (or was canceled: ``JobCanceled``).
"""

from __future__ import annotations

import json
from typing import Any


class GpujobsError(Exception):
    """A request the service refused or could not answer; ``status`` is None when no HTTP answer came."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        type: str = "about:blank",
        title: str = "",
        problem: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if status else detail)
        self.status, self.type, self.title, self.detail = status, type, title, detail
        self.problem: dict[str, Any] = problem or {}
        self.retry_after = retry_after


class ConnectionFailed(GpujobsError):
    """No answer: the connection was refused, dropped or timed out (after the client's retries)."""


class BadRequest(GpujobsError):
    """A 4xx that says the request is wrong (bad JSON, too big, wrong content type…): sending it again won't help."""


class ValidationError(BadRequest):
    """422: ``errors`` lists each bad field as ``{"loc": [...], "msg": ...}``."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        found = self.problem.get("errors")
        return found if isinstance(found, list) else []


class AuthenticationError(GpujobsError):
    """401: the key is missing, unknown or revoked."""


class PermissionDenied(GpujobsError):
    """403: the key may not do this (an admin-only route or job type with a user key)."""


class NotFound(GpujobsError):
    """404: no such job, file or model (or another tenant's, which reads the same)."""


class Conflict(GpujobsError):
    """409: the resource is in the wrong state (cancel a finished job, retry a succeeded one…)."""


class RateLimited(GpujobsError):
    """429: a rate limit or tenant quota; ``retry_after`` says when to try again."""


class ServerError(GpujobsError):
    """5xx other than 503: the service failed (it logs why)."""


class ServiceUnavailable(ServerError):
    """503: a dependency (``problem["dependency"]``) is down; ``retry_after`` says when to try again."""


class JobFailed(GpujobsError):
    """The job finished ``failed``: ``code`` and ``message`` are its ``error``, ``job`` the whole Job."""

    def __init__(self, job: Any) -> None:
        error = job.error or {}
        self.job, self.code = job, str(error.get("code") or job.status)
        self.message = str(error.get("message") or f"the job is {job.status}")
        super().__init__(f"job {job.id} {job.status}: {self.code}: {self.message}", title=job.status)


class JobCanceled(JobFailed):
    """The job finished ``canceled`` (``code`` is ``"canceled"``)."""


class WaitTimeout(GpujobsError):
    """``wait``/``run`` gave up: the job was not finished within the timeout (it goes on)."""


BY_STATUS: dict[int, type[GpujobsError]] = {
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    422: ValidationError,
    429: RateLimited,
    503: ServiceUnavailable,
}


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (the service sends whole seconds; an HTTP date is not parsed: None)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def from_response(status: int, body: bytes, retry_after: str | None = None) -> GpujobsError:
    """The exception for an error answer: problem+json when it parses (anything else keeps its text as detail)."""
    problem: dict[str, Any] = {}
    try:
        parsed = json.loads(body) if body else {}
        if isinstance(parsed, dict):
            problem = parsed
    except ValueError:
        pass
    detail = str(problem.get("detail") or body[:500].decode("utf-8", "replace").strip() or f"HTTP {status}")
    if status in BY_STATUS:
        kind = BY_STATUS[status]
    elif 400 <= status < 500:
        kind = BadRequest
    elif status >= 500:
        kind = ServerError
    else:
        kind = GpujobsError
    return kind(
        detail,
        status=status,
        type=str(problem.get("type") or "about:blank"),
        title=str(problem.get("title") or ""),
        problem=problem,
        retry_after=retry_after_seconds(retry_after),
    )


class DownloadError(GpujobsError):
    """An artifact could not be downloaded as recorded: expired, or its bytes do not match its sha256 or size."""
