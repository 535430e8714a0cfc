"""Redis clients of every gpujobs process, a circuit breaker in front of them, and finish notifications.

Every client is bounded: ``redis_connect_timeout_seconds`` to connect, ``redis_socket_timeout_seconds``
for a command's answer, no client-side retries (a retry would multiply the bound). A blocking
pub/sub ``listen()`` is unaffected: redis-py reads a subscription's messages without the socket
timeout, so the finish listener can share the client (its commands stay bounded).

Redis only ever makes things faster or fairer here (rate limits, failed-login counters, the
``Prefer: wait`` wake-up), so every caller fails open. The breaker makes that cheap: after a Redis
error, ``available()`` answers False for ``redis_breaker_seconds``, so with Redis hung only the
first request pays the socket timeout and the others skip Redis at once; then a single caller
tries again (the others keep skipping while it does) and a success closes the breaker.

Finish notifications over Redis pub/sub let ``Prefer: wait`` answer the moment a job ends, and
change notifications (a new timeline event, saved progress) wake a job's event streams. Best
effort by design: the database stays the truth, and a waiter that misses a message (or runs
without Redis) falls back to reading the job row.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import event
from sqlalchemy.orm import Session

from db.settings import Settings, get_settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}
_breakers: dict[str, Breaker] = {}


def channel(job_id: str) -> str:
    return f"gpujobs:finished:{job_id}"


def changed_channel(job_id: str) -> str:
    """A job's timeline or progress changed (it has not finished: that is ``channel``): wakes its event streams."""
    return f"gpujobs:changed:{job_id}"


class Breaker:
    """Skip Redis for ``open_seconds`` after an error; then let one caller probe it (``probe_seconds`` at most)."""

    def __init__(self, open_seconds: float, probe_seconds: float, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.open_seconds = open_seconds
        self.probe_seconds = probe_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._skip_until = 0.0
        self._tripped = False

    def available(self) -> bool:
        """True when a caller may use Redis now; False while the breaker is open or another caller probes."""
        now = self.clock()
        with self._lock:
            if now < self._skip_until:
                return False
            if self._tripped:
                # This caller is the probe: the others skip until it has had time to fail.
                self._skip_until = now + self.probe_seconds
            return True

    def failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            first = not self._tripped
            self._tripped = True
            self._skip_until = self.clock() + self.open_seconds
        if first:
            log.warning("Redis unavailable (%s: %s); skipping it for %g s at a time", what, exc, self.open_seconds)

    def succeeded(self) -> None:
        if self._tripped:  # read without the lock: the common case costs nothing
            with self._lock:
                was, self._tripped, self._skip_until = self._tripped, False, 0.0
            if was:
                log.warning("Redis answers again")

    @property
    def open(self) -> bool:
        return self._tripped


def redis_client(settings: Settings | None = None) -> redis.Redis | None:
    """This process's client for the settings' Redis (None when there is none), bounded as above."""
    settings = settings or get_settings()
    url = settings.effective_redis_url
    if url is None:
        return None
    with _lock:
        if url not in _clients:
            _clients[url] = redis.Redis.from_url(
                url,
                socket_connect_timeout=settings.redis_connect_timeout_seconds,
                socket_timeout=settings.redis_socket_timeout_seconds,
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 0),
            )
        return _clients[url]


def breaker(settings: Settings | None = None) -> Breaker:
    """The breaker of the settings' Redis in this process."""
    settings = settings or get_settings()
    url = settings.effective_redis_url or ""
    with _lock:
        found = _breakers.get(url)
        if found is None:
            probe = settings.redis_connect_timeout_seconds + settings.redis_socket_timeout_seconds
            found = _breakers[url] = Breaker(settings.redis_breaker_seconds, probe)
        return found


def available_client(settings: Settings | None = None) -> tuple[redis.Redis, Breaker] | None:
    """The client and its breaker when Redis is configured and the breaker lets this caller use it, else None.

    The caller reports ``breaker.failed(what, exc)`` on a ``redis.RedisError`` and ``breaker.succeeded()``
    after an answer.
    """
    settings = settings or get_settings()
    client = redis_client(settings)
    if client is None:
        return None
    guard = breaker(settings)
    if not guard.available():
        return None
    return client, guard


def job_finished(job_id: str) -> None:
    _publish_to(channel(job_id), f"the end of {job_id}")


def job_changed(job_id: str) -> None:
    _publish_to(changed_channel(job_id), f"a change of {job_id}")


def _publish_to(name: str, what: str) -> None:
    found = available_client()
    if found is None:
        return  # waiters and streams re-read the database on their own
    client, guard = found
    try:
        client.publish(name, b"1")
    except redis.RedisError as exc:
        guard.failed(f"publishing {what}", exc)
    else:
        guard.succeeded()


_FINISHED = "gpujobs.finished_jobs"  # session.info key: jobs that reached a final status in this transaction
_CHANGED = "gpujobs.changed_jobs"  # session.info key: jobs whose timeline or progress changed in this transaction


def after_commit(session: Session, job_id: str) -> None:
    """Publish the end of ``job_id`` once the session's transaction commits (never for a rollback)."""
    session.info.setdefault(_FINISHED, set()).add(job_id)


def changed_after_commit(session: Session, job_id: str) -> None:
    """Tell ``job_id``'s event streams, once the transaction commits, that its timeline or progress changed.

    Only a set in the session until then: no statement, and one Redis publish per commit at most."""
    session.info.setdefault(_CHANGED, set()).add(job_id)


def install() -> None:
    """Publish finished jobs after every session commit in this process (``worker.hooks``); idempotent."""
    if not event.contains(Session, "after_commit", _publish):
        event.listen(Session, "after_commit", _publish)
        event.listen(Session, "after_rollback", _forget)


def _publish(session: Session) -> None:
    finished = session.info.pop(_FINISHED, set())
    for job_id in sorted(finished):
        job_finished(job_id)
    for job_id in sorted(session.info.pop(_CHANGED, set()) - finished):  # a finish wakes streams too
        job_changed(job_id)


def _forget(session: Session) -> None:
    session.info.pop(_FINISHED, None)
    session.info.pop(_CHANGED, None)


def reset_clients() -> None:
    with _lock:
        _clients.clear()
        _breakers.clear()
