"""Finish notifications over Redis pub/sub, so ``Prefer: wait`` answers the moment a job ends.

Best effort by design: the database stays the truth, and a waiter that misses a
message (or runs without Redis) falls back to reading the job row.
"""

from __future__ import annotations

import logging
import threading

import redis
from sqlalchemy import event
from sqlalchemy.orm import Session

from db.settings import Settings, get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}


def channel(job_id: str) -> str:
    return f"gpujobs:finished:{job_id}"


def redis_client(settings: Settings | None = None) -> redis.Redis | None:
    url = (settings or get_settings()).effective_redis_url
    if url is None:
        return None
    with _lock:
        if url not in _clients:
            _clients[url] = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        return _clients[url]


def job_finished(job_id: str) -> None:
    client = redis_client()
    if client is None:
        return
    try:
        client.publish(channel(job_id), b"1")
    except redis.RedisError as exc:
        log.warning("could not publish the end of %s: %s", job_id, exc)


_FINISHED = "gpujobs.finished_jobs"  # session.info key: jobs that reached a final status in this transaction


def after_commit(session: Session, job_id: str) -> None:
    """Publish the end of ``job_id`` once the session's transaction commits (never for a rollback)."""
    session.info.setdefault(_FINISHED, set()).add(job_id)


def install() -> None:
    """Publish finished jobs after every session commit in this process (``worker.hooks``); idempotent."""
    if not event.contains(Session, "after_commit", _publish):
        event.listen(Session, "after_commit", _publish)
        event.listen(Session, "after_rollback", _forget)


def _publish(session: Session) -> None:
    for job_id in sorted(session.info.pop(_FINISHED, ())):
        job_finished(job_id)


def _forget(session: Session) -> None:
    session.info.pop(_FINISHED, None)


def reset_clients() -> None:
    with _lock:
        _clients.clear()
