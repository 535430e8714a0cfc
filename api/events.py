"""``GET /v1/jobs/{id}/events``: a job's timeline, as JSON or live as server-sent events.

With ``Accept: text/event-stream`` the answer is a stream (docs/api.md, "Job events"):

- one SSE event per ``job_events`` row, ``id:`` the row's id, ``event:`` its kind (``milestone`` for
  a progress row), ``data:`` the row as JSON; a first connect replays the timeline so far, and a
  ``Last-Event-ID`` (header, or ``?last_event_id=`` for a browser's first connect) resumes after it;
- ``progress`` events, without ``id:``, each time the job's saved progress changes while it runs.
  Progress is saved by the worker's control thread (``control_poll_seconds``), not written as a
  row per step: a stream sees it at that granularity at no cost to the worker;
- ``: keep-alive`` comments while nothing happens (``sse_keepalive_seconds``);
- after the terminal event, a last ``job`` event with the Job as ``GET /v1/jobs/{id}`` returns it,
  and the stream ends.

Idle streams hold no database connection: a stream reads what is new, ends its transaction and
parks on an event of the process's listener (``api.waiting``), which Redis change and finish
notifications set. The database stays the truth: a stream re-reads at each keep-alive, and every
``sse_recheck_seconds`` while the listener has no Redis subscription.

Without ``Accept: text/event-stream`` the same path answers ``{"items": [event…]}`` (after
``Last-Event-ID`` when given).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator, Iterator
from contextlib import AbstractContextManager
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload

from api import config, waiting
from api.auth import current_key, is_admin
from api.errors import ApiError, close_quietly, validation_error
from api.openapi import document
from db.models import EventKind, Job, JobEvent, JobStatus
from db.session import session_factory
from db.settings import Settings
from db.wire import job_json, rfc3339

bp = Blueprint("events", __name__, url_prefix="/v1/jobs")

STREAM = "text/event-stream"
MAX_EVENT_ID = 2**63 - 1  # job_events.id is a BIGINT
RETRY_MS = 2000  # the reconnect delay a stream suggests to its client (`retry:`)

log = logging.getLogger(__name__)


def event_name(kind: str) -> str:
    """The SSE ``event:`` of a timeline row: its kind; ``milestone`` for a progress row (``progress`` is live)."""
    return "milestone" if kind == EventKind.PROGRESS.value else kind


def event_json(event: JobEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "job_id": event.job_id,
        "kind": event.kind,
        "at": rfc3339(event.at),
        "attempt": event.attempt,
        "message": event.message,
        "data": event.data,
    }


def frame(name: str, data: dict[str, Any], event_id: int | None = None) -> str:
    """One SSE event (JSON on one ``data:`` line: it has no newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def last_event_id() -> int | None:
    """``Last-Event-ID`` (header; a reconnecting client's) or else ``?last_event_id=``: a whole number, or None.

    Both are checked when both are given; anything but a whole number (an empty query value included: the
    OpenAPI document says integer), or the query parameter given twice → 422."""
    if len(request.args.getlist("last_event_id")) > 1:
        raise validation_error(["query", "last_event_id"], "give it at most once")
    found = []
    for loc, value in (
        (["header", "Last-Event-ID"], request.headers.get("Last-Event-ID")),
        (["query", "last_event_id"], request.args.get("last_event_id")),
    ):
        if value is None or (value == "" and loc[0] == "header"):  # an empty header is the SSE spec's "no id"
            continue
        if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > MAX_EVENT_ID:
            raise validation_error(loc, "must be the id of a job event (a whole number from 0), as `id:` sent it")
        found.append(int(value))
    return found[0] if found else None


def _visible(job_id: str, tenant_id: str | None) -> Any:
    """The job's status, progress, attempts and newest event id (one statement, one snapshot), if ``tenant_id``'s
    (any tenant's for None: an admin key)."""
    latest = select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id).scalar_subquery()
    query = select(Job.status, Job.progress, Job.attempts, latest.label("latest")).where(Job.id == job_id)
    return query if tenant_id is None else query.where(Job.tenant_id == tenant_id)


def _events_after(db: Session, job_id: str, after: int | None) -> list[JobEvent]:
    query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    return list(db.scalars(query))


def _read(
    db: Session, shared: waiting.Shared, job_id: str, tenant_id: str | None, after: int | None, fresh: bool
) -> tuple[Any, list[tuple[str, dict[str, Any], int]]]:
    """The job (status, progress, attempts) and the frames of its events after ``after``.

    The job's streams in this process share one read per wake-up (``shared.generation``): the first stream
    woken reads, the others of the job waiting on the lock take its read. ``fresh`` reads anyway (a stream's
    first read, and its timer re-reads: the fallback for a missed notice). The job and its newest event id
    come in one statement (a terminal status comes with its event's id); the events themselves only when
    there are new ones (a progress save has none)."""
    with shared.lock:
        generation = shared.generation
        found = shared.reads.get(after)
        if found is not None and found[0] == generation and not fresh:
            return found[1]  # type: ignore[no-any-return]
        job = db.execute(_visible(job_id, tenant_id)).first()
        new = job is not None and job.latest is not None and (after is None or job.latest > after)
        events = _events_after(db, job_id, after) if new else []
        read = (job, [(event_name(e.kind), event_json(e), e.id) for e in events])
        shared.reads = {k: v for k, v in shared.reads.items() if v[0] == generation}
        shared.reads[after] = (generation, read)
        return read


def _wants_stream() -> bool:
    return request.accept_mimetypes.best_match(["application/json", STREAM]) == STREAM


@bp.get("/<job_id>/events")
@document(
    "A job's timeline: live as server-sent events (`Accept: text/event-stream`), else as JSON",
    query=["last_event_id"],
    responses={200: "JobEventList", 404: "Problem", 422: "Problem", 429: "Problem"},
    stream=STREAM,
)
def job_events(job_id: str) -> Response:
    after = last_event_id()
    key = current_key()
    tenant_id = None if is_admin() else key.tenant_id
    if g.db.execute(_visible(job_id, tenant_id)).first() is None:
        raise ApiError(404, f"No job {job_id!r}.")
    if not _wants_stream():
        return jsonify({"items": [event_json(e) for e in _events_after(g.db, job_id, after)]})
    return stream_response(job_id, tenant_id, key.id, key.tenant_id, after)


def stream_response(job_id: str, tenant_id: str | None, key_id: str, key_tenant: str, after: int | None) -> Response:
    """The stream of a job the caller may see (checked: this only streams), counted under the caps of the
    caller's key and tenant (429 over one). The admin job page uses it too."""
    settings = config.settings()
    hold = waiting.listener(settings).reserve_stream(key_id, key_tenant, settings.sse_max_seconds, settings)
    hold.__enter__()  # a 429 now, before the stream starts; released when the stream ends
    g.db.commit()  # the request's connection goes back to the pool before the first byte
    body = _Body(_stream(settings, job_id, tenant_id, after), hold)
    return Response(body, mimetype=STREAM, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Body:
    """The stream's iterable: releases the stream's place under its caps when the server closes it, even if
    the generator never started (a client gone before the first byte)."""

    def __init__(self, events: Generator[str, None, None], hold: AbstractContextManager[None]) -> None:
        self.events, self.hold, self.released = events, hold, False

    def __iter__(self) -> Iterator[str]:
        return self.events

    def close(self) -> None:
        try:
            self.events.close()
        finally:
            if not self.released:
                self.released = True
                self.hold.__exit__(None, None, None)


def _stream(settings: Settings, job_id: str, tenant_id: str | None, after: int | None) -> Generator[str, None, None]:
    """The events of one stream. Its own session (the request's is closed once the view returns), whose
    connection goes back to the pool after each read."""
    listener = waiting.listener(settings)
    ends = time.monotonic() + settings.sse_max_seconds
    progress: Any = None
    db = session_factory(settings.database_url, settings)()
    try:
        with listener.watch(job_id) as (changed, shared):
            yield f"retry: {RETRY_MS}\n\n"
            sent = time.monotonic()
            fresh = True  # a first read, or a re-read on the stream's own timer: its own, not a shared one
            while True:
                changed.clear()  # before the read: a change during it wakes the next wait at once
                try:
                    job, frames = _read(db, shared, job_id, tenant_id, after, fresh)
                except Exception as exc:  # the database is down: end; the client resumes with Last-Event-ID
                    log.warning("event stream of %s ends: could not read it: %s", job_id, exc)
                    return
                for name, data, event_id in frames:
                    yield frame(name, data, event_id)
                    after = event_id
                if job is None:  # deleted (retention) while streaming
                    db.commit()
                    return
                status = JobStatus(job.status)
                if status.finished:
                    whole = db.scalars(select(Job).where(Job.id == job_id).options(joinedload(Job.artifacts))).unique()
                    yield frame("job", job_json(whole.one()))
                    db.commit()
                    return
                if status is JobStatus.RUNNING and job.progress and job.progress != progress:
                    progress = job.progress
                    yield frame("progress", {"job_id": job_id, "attempt": job.attempts, "progress": progress})
                    sent = time.monotonic()
                if frames:
                    sent = time.monotonic()
                db.commit()  # idle streams hold no connection
                while True:
                    now = time.monotonic()
                    if now >= ends:
                        return  # the client resumes with Last-Event-ID
                    timeout = min(sent + settings.sse_keepalive_seconds, ends) - now
                    if not listener.subscribed.is_set():
                        timeout = min(timeout, settings.sse_recheck_seconds)
                    fresh = False
                    if changed.wait(max(timeout, 0.0)):
                        break
                    fresh = True
                    if time.monotonic() - sent >= settings.sse_keepalive_seconds:
                        yield ": keep-alive\n\n"
                        sent = time.monotonic()
                        break  # a re-read at every keep-alive: the fallback for a missed notification
                    if not listener.subscribed.is_set():
                        break  # Redis is down: re-read every sse_recheck_seconds
    finally:
        close_quietly(db)
