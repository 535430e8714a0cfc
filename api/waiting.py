"""``Prefer: wait``: hold a request until its job finishes, at no thread, connection or query per request.

Under ``gpujobs api``'s gevent workers a waiting request is a greenlet parked on an event,
and the two loops below are greenlets too (the standard library is patched), so waits hold
no thread; under gthread workers they hold their request thread, as any request does.

- **Wake-up (the fast path).** One listener per API process subscribes to every job's finish
  channel on Redis and sets the events of that job's waiters: an answer leaves within
  milliseconds of the commit that finished the job.
- **Re-read (the fallback).** One loop per process reads, every ``wait_recheck_seconds``, which
  of the waited-for jobs have finished, in one query for all of them (so 500 waiters cost one
  query a period, not 500), and wakes their waiters. It covers a message missed while the
  listener reconnected (it also runs at once after every (re)subscribe) and a Redis that is
  down, when it is the only way waits end.
- **No connection held.** A waiter ends its transaction before it parks (its connection goes
  back to the pool) and reads the job again only when woken.
- **Caps.** Each API process counts its waits per key and per tenant (``max_waits_per_key``,
  ``max_waits_per_tenant``); one more is refused with 429 and a ``Retry-After`` of the time
  until the first of the full scope's waits ends at the latest.

The database stays the truth: a waiter answers only after it has read the job finished (or
its time is up).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis
from sqlalchemy import select

from api.errors import ApiError
from db import notify
from db.models import Job, JobStatus
from db.session import session_factory
from db.settings import Settings

log = logging.getLogger(__name__)

FINISHED = [status.value for status in JobStatus if status.finished]
RECHECK_BATCH = 500  # job ids in one re-read query


class FinishListener:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._waiters: dict[str, set[threading.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        # Deadlines (monotonic) of the waits in progress, per key and per tenant.
        self._deadlines: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
        self._tokens = itertools.count()
        self._recheck_now = threading.Event()
        self.subscribed = threading.Event()  # set while the listener holds its subscription
        self.rechecks = 0  # re-read queries made (tests and diagnostics)
        for target, name in ((self._listen, "finish-listener"), (self._recheck_loop, "finish-recheck")):
            threading.Thread(target=target, name=name, daemon=True).start()

    # --- caps ----------------------------------------------------------------------------------

    @contextmanager
    def reserve(self, key_id: str, tenant_id: str, seconds: float, settings: Settings) -> Iterator[None]:
        """Hold one wait of ``key_id`` and ``tenant_id`` for the block, or raise a 429 if either is at its cap."""
        scopes = [
            (("key", key_id), settings.max_waits_per_key, "This API key"),
            (("tenant", tenant_id), settings.max_waits_per_tenant, "This tenant"),
        ]
        token = next(self._tokens)
        now = time.monotonic()
        with self._lock:
            for scope, cap, who in scopes:
                held = self._deadlines[scope]
                if len(held) >= cap:
                    retry_after = max(1, math.ceil(min(held.values()) - now))
                    raise ApiError(
                        429,
                        f"{who} already holds {cap} waiting requests (`Prefer: wait`) on this "
                        f"server; retry after {retry_after} s, or poll without `Prefer: wait`.",
                        title="Too Many Requests",
                        headers={"Retry-After": str(retry_after)},
                    )
            for scope, _, _ in scopes:
                self._deadlines[scope][token] = now + seconds
        try:
            yield
        finally:
            with self._lock:
                for scope, _, _ in scopes:
                    held = self._deadlines[scope]
                    held.pop(token, None)
                    if not held:
                        del self._deadlines[scope]

    def waits(self) -> int:
        """Waits in progress in this process."""
        with self._lock:
            return sum(len(events) for events in self._waiters.values())

    # --- waiting --------------------------------------------------------------------------------

    def wait(self, job_id: str, seconds: float, finished: Callable[[], bool]) -> None:
        """Return when ``finished()`` holds or ``seconds`` have passed.

        ``finished`` reads the job and ends its transaction: between two calls the waiter holds no
        database connection. It is called once at the start and once after each wake-up."""
        event = threading.Event()
        with self._lock:
            self._waiters[job_id].add(event)
        try:
            deadline = time.monotonic() + seconds
            while not finished():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not event.wait(remaining):
                    return
                event.clear()
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[job_id]

    def _wake(self, job_ids: list[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                for event in self._waiters.get(job_id, ()):
                    event.set()

    # --- the fast path: Redis ---------------------------------------------------------------------

    def _listen(self) -> None:
        prefix = notify.channel("")
        backoff = 0.5
        while True:
            client = notify.redis_client(self.settings)  # the process's bounded client; its own connection
            if client is None:
                return  # no Redis: waits end by the re-read alone
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(notify.channel("*"))
                self.subscribed.set()
                self._recheck_now.set()  # what finished while it was not subscribed is read now
                backoff = 0.5
                for message in pubsub.listen():
                    if message.get("type") == "pmessage":
                        self._wake([message["channel"].decode()[len(prefix) :]])
            except (redis.RedisError, OSError) as exc:
                log.warning("finish listener lost Redis (%s); waits rely on the re-read; retry in %.1f s", exc, backoff)
            finally:
                self.subscribed.clear()
                pubsub.close()
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    # --- the fallback: one re-read for every waiter ------------------------------------------------

    def _recheck_loop(self) -> None:
        sessions = session_factory(self.settings.database_url)
        while True:
            self._recheck_now.wait(self.settings.wait_recheck_seconds)
            self._recheck_now.clear()
            with self._lock:
                job_ids = list(self._waiters)
            if not job_ids:
                continue
            try:
                with sessions() as session:
                    for start in range(0, len(job_ids), RECHECK_BATCH):
                        batch = job_ids[start : start + RECHECK_BATCH]
                        query = select(Job.id).where(Job.id.in_(batch), Job.status.in_(FINISHED))
                        self._wake(list(session.scalars(query)))
                        self.rechecks += 1
            except Exception as exc:  # the database is down: waits end at their time limit
                log.warning("could not re-read waited jobs: %s", exc)


_listeners: dict[tuple[str, str | None], FinishListener] = {}
_listeners_lock = threading.Lock()


def listener(settings: Settings) -> FinishListener:
    """The process's listener for this database and Redis (one per process in a deployment)."""
    where = (settings.database_url, settings.effective_redis_url)
    with _listeners_lock:
        if where not in _listeners:
            _listeners[where] = FinishListener(settings)
        return _listeners[where]
