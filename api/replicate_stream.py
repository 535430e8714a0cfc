"""``GET /replicate/v1/predictions/{id}/stream``: a prediction as server-sent events in Replicate's format.

The client's ``stream()`` parser knows four event names (``output``, ``logs``, ``error``, ``done``), raises
on any other, and drops an event without an ``id:``: ``GET /v1/jobs/{id}/events`` (``queued``,
``progress``, ``job``…) cannot serve it. This stream sends, from the same reads:

- ``logs``: a timeline event as its log line (``id:`` the event's id), and the job's progress as a tqdm
  line each time it changes (``id:`` ``<last event id>.<step>``);
- on success, one ``output`` per artifact URL of the output, in order (the client makes each a
  ``FileOutput``), then ``done`` with ``{}``;
- on failure an ``error`` with ``{"detail": …}`` (the client raises it); after a cancel ``done`` with
  ``{"reason": "canceled"}``; and the stream ends.

It is ``api.events``' machinery: the process's listener wakes it (Redis notifications), the job's streams
share one read per wake-up, it holds no database connection while idle, re-reads at each keep-alive and
counts under the same per-key and per-tenant stream caps. A reconnect's ``Last-Event-ID`` resumes after
the timeline event it names.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator
from typing import Any

from flask import Response, g, request
from sqlalchemy import select
from sqlalchemy.orm import joinedload

from api import config, waiting
from api.errors import close_quietly
from api.events import RETRY_MS, STREAM, _Body, _read
from api.replicate_wire import error_of, file_urls, output_of, progress_line
from db.models import Job, JobStatus
from db.session import session_factory
from db.settings import Settings

log = logging.getLogger(__name__)


def frame(name: str, data: str, event_id: str) -> str:
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"id: {event_id}\nevent: {name}\n{lines}\n"


def _resume_after() -> int | None:
    """The timeline event a reconnect's ``Last-Event-ID`` names (its part before a ``.``); None if none or not ours."""
    value = request.headers.get("Last-Event-ID", "").partition(".")[0]
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None


def response(job_id: str, tenant_id: str | None, key_id: str, key_tenant: str) -> Response:
    """The stream of a job the caller may see (checked by the caller), under the caller's stream caps (429)."""
    settings = config.settings()
    hold = waiting.listener(settings).reserve_stream(key_id, key_tenant, settings.sse_max_seconds, settings)
    hold.__enter__()  # a 429 now, before the stream starts; released when the stream ends
    after = _resume_after()
    g.db.commit()  # the request's connection goes back to the pool before the first byte
    body = _Body(_stream(settings, job_id, tenant_id, after), hold)
    return Response(body, mimetype=STREAM, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _log(data: dict[str, Any]) -> str:
    message = f": {data['message']}" if data.get("message") else ""
    return f"{data['at']} {data['kind']}{message}"


def _ending(job: Job, last: str) -> Generator[str, None, None]:
    status = JobStatus(job.status)
    if status is JobStatus.SUCCEEDED:
        for index, url in enumerate(file_urls(output_of(job))):
            yield frame("output", url, f"{last}.o{index}")
        yield frame("done", "{}", f"{last}.done")
    elif status is JobStatus.FAILED:
        yield frame("error", json.dumps({"detail": error_of(job)}), f"{last}.error")
    else:
        yield frame("done", json.dumps({"reason": "canceled"}), f"{last}.done")


def _stream(settings: Settings, job_id: str, tenant_id: str | None, after: int | None) -> Generator[str, None, None]:
    listener = waiting.listener(settings)
    ends = time.monotonic() + settings.sse_max_seconds
    progress: Any = None
    db = session_factory(settings.database_url, settings)()
    try:
        with listener.watch(job_id) as (changed, shared):
            yield f"retry: {RETRY_MS}\n\n"
            sent = time.monotonic()
            fresh = True
            while True:
                changed.clear()  # before the read: a change during it wakes the next wait at once
                try:
                    job, frames = _read(db, shared, job_id, tenant_id, after, fresh)
                except Exception as exc:  # the database is down: end; the client may reconnect
                    log.warning("replicate stream of %s ends: could not read it: %s", job_id, exc)
                    return
                for _name, data, event_id in frames:
                    yield frame("logs", _log(data), str(event_id))
                    after = event_id
                if frames:
                    sent = time.monotonic()
                if job is None:  # deleted (retention) while streaming
                    db.commit()
                    return
                last = str(after or 0)
                if JobStatus(job.status).finished:
                    query = select(Job).where(Job.id == job_id).options(joinedload(Job.artifacts))
                    yield from _ending(db.scalars(query).unique().one(), last)
                    db.commit()
                    return
                if job.status == JobStatus.RUNNING.value and job.progress and job.progress != progress:
                    progress = job.progress
                    line = progress_line(progress)
                    if line:
                        yield frame("logs", line, f"{last}.{progress.get('step', 0)}")
                        sent = time.monotonic()
                db.commit()  # idle streams hold no connection
                parked = _park(settings, listener, changed, sent, ends)
                if parked is None:
                    return
                fresh = parked
                if fresh:
                    yield ": keep-alive\n\n"
                    sent = time.monotonic()
    finally:
        close_quietly(db)


def _park(settings: Settings, listener: waiting.FinishListener, changed: Any, sent: float, ends: float) -> bool | None:
    """Wait for a change (False), a keep-alive or a re-read while Redis is down (True: read afresh), or the
    stream's end (None)."""
    now = time.monotonic()
    if now >= ends:
        return None
    timeout = min(sent + settings.sse_keepalive_seconds, ends) - now
    if not listener.subscribed.is_set():
        timeout = min(timeout, settings.sse_recheck_seconds)
    return not changed.wait(max(timeout, 0.0))
