"""``Client``: the service's HTTP API v1 from Python (docs/clients.md), on the base install alone.

``run`` is the one call most users need: it uploads the file inputs, submits, follows the job's event
stream (resuming with ``Last-Event-ID`` when the connection drops) and returns the finished ``Job`` or
raises ``JobFailed``. The other methods map one route each. Every submit carries an ``Idempotency-Key``
(one per call, reused by its retries), so a retried submit never makes a second job.
"""

from __future__ import annotations

import builtins
import hashlib
import mimetypes
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any, BinaryIO

import urllib3

from gpujobs.client import sse
from gpujobs.client.errors import (
    ConnectionFailed,
    DownloadError,
    GpujobsError,
    RateLimited,
    ServiceUnavailable,
    WaitTimeout,
)
from gpujobs.client.models import Event, Job, Page
from gpujobs.client.transport import Transport

FileInput = bytes | bytearray | memoryview | os.PathLike[str] | BinaryIO
ProgressCallback = Callable[[Event], None]
STREAM_READ_TIMEOUT = 60.0  # the server sends a keep-alive every 15 s (by default): silence this long is a dead link
MAX_PREFER_WAIT = 60  # the most `Prefer: wait` the service honours


def _version() -> str:
    from gpujobs import __version__

    return __version__


class Client:
    """A client of one gpujobs service with one API key.

    ``url`` and ``key`` default to ``GPUJOBS_URL`` and ``GPUJOBS_KEY``. ``timeout`` bounds each connect and
    each read (seconds); ``max_retries`` is how many times a request is resent after a connection error,
    a 429 or a 503 (waiting its ``Retry-After``, at most ``max_retry_wait`` seconds: a longer one is raised).
    """

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        stream_read_timeout: float = STREAM_READ_TIMEOUT,
    ) -> None:
        url = url or os.environ.get("GPUJOBS_URL")
        key = key or os.environ.get("GPUJOBS_KEY")
        if not url or not key:
            raise ValueError("give the service's url and an API key (or set GPUJOBS_URL and GPUJOBS_KEY)")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        self.stream_read_timeout = stream_read_timeout
        self.transport = Transport(
            self.url,
            key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait=max_retry_wait,
            user_agent=f"gpujobs-python/{_version()}",
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.pool.clear()

    # --- files ---------------------------------------------------------------------------------------

    def upload(self, file: FileInput, *, filename: str | None = None, purpose: str = "input") -> dict[str, Any]:
        """``POST /v1/files``: bytes, a path or an open binary file; returns the ``File`` (its ``id`` is the input)."""
        if isinstance(file, bytes | bytearray | memoryview):
            data, name = bytes(file), filename or "upload"
        elif isinstance(file, os.PathLike):
            path = Path(file)
            data, name = path.read_bytes(), filename or path.name
        elif hasattr(file, "read"):
            data = file.read()
            if not isinstance(data, bytes):
                raise TypeError("open the file in binary mode ('rb')")
            name = filename or PurePath(str(getattr(file, "name", "") or "upload")).name
        else:
            raise TypeError(f"upload takes bytes, a path or a binary file, not {type(file).__name__}")
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        fields = {"file": (name, data, content_type), "purpose": purpose}
        answer = self.transport.request("POST", "/v1/files", fields=fields)
        return dict(answer.json())

    def prepare(self, value: Any) -> Any:
        """A job input value as the API takes it: files (bytes, paths, open files) uploaded and replaced by their
        ids, in lists too; strings (ids, URLs, data URIs) and everything else as they are."""
        if isinstance(value, bytes | bytearray | memoryview | os.PathLike) or hasattr(value, "read"):
            return self.upload(value)["id"]
        if isinstance(value, list | tuple):
            return [self.prepare(item) for item in value]
        return value

    # --- jobs ----------------------------------------------------------------------------------------

    def submit(
        self,
        type: str,
        input: Mapping[str, Any] | None = None,
        /,
        *,
        metadata: Mapping[str, Any] | None = None,
        priority: int | None = None,
        webhook: str | None = None,
        webhook_events_filter: builtins.list[str] | None = None,
        idempotency_key: str | None = None,
        wait: int | None = None,
        **fields: Any,
    ) -> Job:
        """``POST /v1/jobs``: the job of ``type`` with ``input`` and ``fields`` merged (files uploaded first).

        ``idempotency_key`` defaults to a fresh one per call; ``wait`` (seconds, ≤ 60) holds the answer until
        the job finishes or the time is up (``Prefer: wait``)."""
        merged = {**(input or {}), **fields}
        body: dict[str, Any] = {"type": type, "input": {name: self.prepare(value) for name, value in merged.items()}}
        for name, value in (
            ("metadata", metadata),
            ("priority", priority),
            ("webhook", webhook),
            ("webhook_events_filter", webhook_events_filter),
        ):
            if value is not None:
                body[name] = dict(value) if isinstance(value, Mapping) else value
        headers = {"Idempotency-Key": idempotency_key or f"gpujobs-py-{uuid.uuid4().hex}"}
        if wait:
            headers["Prefer"] = f"wait={int(wait)}"
        answer = self.transport.request("POST", "/v1/jobs", json_body=body, headers=headers, held=wait or 0)
        return self._job(answer.json())

    def get(self, job_id: str, *, wait: int | None = None) -> Job:
        """``GET /v1/jobs/{id}`` (``wait``: hold the answer up to that many seconds for the job to finish)."""
        headers = {"Prefer": f"wait={int(wait)}"} if wait else None
        answer = self.transport.request("GET", f"/v1/jobs/{job_id}", headers=headers, held=wait or 0)
        return self._job(answer.json())

    def list(
        self, *, status: str | None = None, type: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> Page:
        """``GET /v1/jobs``: one page, newest first; pass ``page.next_cursor`` as ``cursor`` for the next."""
        query = {"status": status, "type": type, "limit": limit, "cursor": cursor}
        data = self.transport.request("GET", "/v1/jobs", query=query).json()
        return Page([self._job(item) for item in data["items"]], data.get("next_cursor"))

    def iter_jobs(self, *, status: str | None = None, type: str | None = None) -> Iterator[Job]:
        """Every job the key sees (of ``status``/``type``), newest first, page after page."""
        cursor: str | None = None
        while True:
            page = self.list(status=status, type=type, limit=100, cursor=cursor)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> Job:
        """``POST /v1/jobs/{id}/cancel``: a queued job is canceled at once, a running one at its next step."""
        return self._job(self.transport.request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def retry(self, job_id: str, *, idempotency_key: str | None = None) -> Job:
        """``POST /v1/jobs/{id}/retry``: a new job with a failed or canceled job's input."""
        headers = {"Idempotency-Key": idempotency_key or f"gpujobs-py-{uuid.uuid4().hex}"}
        return self._job(self.transport.request("POST", f"/v1/jobs/{job_id}/retry", headers=headers).json())

    def _job(self, data: Any) -> Job:
        return Job.from_json(data, self)

    # --- following a job -----------------------------------------------------------------------------

    def events(self, job_id: str, *, last_event_id: int | None = None, timeout: float | None = None) -> Iterator[Event]:
        """The job's server-sent events (``GET /v1/jobs/{id}/events``) until its last, ``job``.

        A dropped connection (or a stream the server ended early) is resumed after the last event seen
        (``Last-Event-ID``), so no timeline event is lost or repeated; ``max_retries`` reconnects in a row
        without an event in between, then ``ConnectionFailed``. ``timeout``: ``WaitTimeout`` after that long."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last, failures = last_event_id, 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            read_timeout = self.stream_read_timeout
            if deadline is not None:
                read_timeout = max(0.1, min(read_timeout, deadline - time.monotonic() + 0.5))
            problem: BaseException | None = None
            try:
                response = self.transport.open_stream(f"/v1/jobs/{job_id}/events", headers, read_timeout)
            except (RateLimited, ServiceUnavailable) as exc:
                if failures >= self.transport.max_retries:
                    raise
                failures += 1
                self.transport.sleep(self.transport.retry_delay(exc, failures))
                continue
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                problem = exc
            else:
                try:
                    for raw in sse.events(response):
                        if deadline is not None and time.monotonic() > deadline:
                            raise WaitTimeout(f"job {job_id} was not finished after {timeout:g} s (it goes on)")
                        if raw is None:
                            continue
                        event_id = int(raw.id) if raw.id is not None and raw.id.isdigit() else None
                        event = Event(raw.event, sse.decode(raw), event_id)
                        if event_id is not None:
                            last = event_id
                        failures = 0
                        yield event
                        if event.event == "job":
                            return
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    problem = exc  # dropped or silent past the read timeout: resume below
                finally:
                    response.close()
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} was not finished after {timeout:g} s (it goes on)")
            if failures >= self.transport.max_retries:
                why = f": {problem}" if problem else " (the stream kept ending before the job did)"
                raise ConnectionFailed(f"lost the event stream of {job_id} {failures + 1} times in a row{why}")
            self.transport.sleep(self.transport.backoff(failures))
            failures += 1

    def wait(self, job_id: str, *, timeout: float | None = None, progress: ProgressCallback | None = None) -> Job:
        """Follow the job until it finishes and return it, whatever its status (``run`` raises on failure).

        ``progress`` is called with each ``Event`` as it comes. Where the key already holds as many streams as
        the service allows (429 on the stream), this falls back to ``GET`` with ``Prefer: wait``."""
        try:
            for event in self.events(job_id, timeout=timeout):
                if progress is not None:
                    progress(event)
                if event.event == "job":
                    return self._job(event.data)
        except RateLimited:
            pass
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = MAX_PREFER_WAIT if deadline is None else int(min(MAX_PREFER_WAIT, deadline - time.monotonic()))
            job = self.get(job_id, wait=max(left, 1))
            if job.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} was not finished after {timeout:g} s (it goes on)")

    def run(
        self,
        type: str,
        input: Mapping[str, Any] | None = None,
        /,
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        priority: int | None = None,
        **fields: Any,
    ) -> Job:
        """Upload the file inputs, submit, follow the job to its end and return it; ``JobFailed`` (or
        ``JobCanceled``) if it did not succeed, ``WaitTimeout`` after ``timeout`` seconds."""
        job = self.submit(type, input, metadata=metadata, priority=priority, **fields)
        return self.wait(job.id, timeout=timeout, progress=progress).raise_for_status()

    # --- outputs -------------------------------------------------------------------------------------

    def download(self, job: Job | str, directory: str | os.PathLike[str] = ".") -> builtins.list[Path]:
        """Every artifact of a succeeded job into ``directory`` (made if missing); the paths written.

        Each file is written under its artifact name (its last path part only: a name cannot climb out of
        ``directory``) once its size and sha256 match the job's record; a mismatch → ``DownloadError``."""
        if isinstance(job, str):
            job = self.get(job)
        if not job.succeeded:
            raise DownloadError(f"job {job.id} is {job.status}: only a succeeded job has outputs")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for artifact in job.artifacts:
            name = PurePath(artifact.name.replace("\\", "/")).name
            if name in ("", ".", ".."):
                raise DownloadError(f"artifact {artifact.where} has no usable file name: {artifact.name!r}")
            if artifact.url is None:
                raise DownloadError(f"artifact {artifact.where} of {job.id} has expired (retention deleted it)")
            written.append(self._fetch(artifact.url, folder / name, artifact.sha256, artifact.size))
        return written

    def _fetch(self, url: str, target: Path, sha256: str, size: int) -> Path:
        response = self.transport.fetch(url)
        digest, count = hashlib.sha256(), 0
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(handle, "wb") as out:
                for chunk in response.stream(1 << 16):
                    digest.update(chunk)
                    count += len(chunk)
                    out.write(chunk)
            if digest.hexdigest() != sha256 or count != size:
                raise DownloadError(
                    f"{target.name}: got {count} bytes with sha256 {digest.hexdigest()}, "
                    f"the job recorded {size} bytes with sha256 {sha256}"
                )
            os.replace(temporary, target)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ConnectionFailed(f"downloading {target.name}: {exc}") from exc
        finally:
            response.release_conn()
            if os.path.exists(temporary):
                os.unlink(temporary)
        return target


__all__ = ["Client", "GpujobsError"]
