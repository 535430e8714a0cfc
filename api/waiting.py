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

The same listener wakes event streams (``api.events``): a job's change notifications (a new
timeline event, saved progress) and its finish set the events of its streams, which then read
what is new. Streams re-read on their own timer as their fallback, and have their own caps
(``max_streams_per_key``, ``max_streams_per_tenant``).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import redis
from sqlalchemy import select

from api.quotas import too_many
from db import notify
from db.models import Job, JobStatus
from db.session import session_factory
from db.settings import Settings

log = logging.getLogger(__name__)

FINISHED = [status.value for status in JobStatus if status.finished]
RECHECK_BATCH = 500  # job ids in one re-read query


class Shared:
    """What the streams of one job share in a process: a generation, bumped by every wake-up of the job, and
    the last read per resume point (``api.events`` reads once per generation for all of the job's streams)."""

    def __init__(self) -> None:
        self.generation = 0
        self.lock = threading.Lock()  # one stream reads while the others of the job wait for its read
        self.reads: dict[Any, tuple[int, Any]] = {}


class FinishListener:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._waiters: dict[str, set[threading.Event]] = defaultdict(set)
        self._streams: dict[str, set[threading.Event]] = defaultdict(set)  # event streams, per job (api.events)
        self._shared: dict[str, Shared] = {}  # per job with streams
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

    def reserve(self, key_id: str, tenant_id: str, seconds: float, settings: Settings) -> AbstractContextManager[None]:
        """Hold one wait of ``key_id`` and ``tenant_id`` for the block, or raise a 429 if either is at its cap."""
        scopes = [
            (("key", key_id), settings.max_waits_per_key, "This API key", "waits_per_key"),
            (("tenant", tenant_id), settings.max_waits_per_tenant, "This tenant", "waits_per_tenant"),
        ]
        return self._hold(scopes, seconds, "waiting requests (`Prefer: wait`)", "poll without `Prefer: wait`")

    def reserve_stream(
        self, key_id: str, tenant_id: str, seconds: float, settings: Settings
    ) -> AbstractContextManager[None]:
        """Hold one event stream of ``key_id`` and ``tenant_id`` for the block, or raise a 429 over a cap."""
        scopes = [
            (("stream-key", key_id), settings.max_streams_per_key, "This API key", "streams_per_key"),
            (("stream-tenant", tenant_id), settings.max_streams_per_tenant, "This tenant", "streams_per_tenant"),
        ]
        return self._hold(scopes, seconds, "event streams", "read the job without `Accept: text/event-stream`")

    @contextmanager
    def _hold(
        self, scopes: list[tuple[tuple[str, str], int, str, str]], seconds: float, what: str, instead: str
    ) -> Iterator[None]:
        """Hold one place in each scope (``(scope, cap, who, quota)``) for the block; a 429 naming the
        first full one (``Retry-After`` and ``RateLimit-*``: when the soonest held place ends at the latest)."""
        token = next(self._tokens)
        now = time.monotonic()
        with self._lock:
            for scope, cap, who, quota in scopes:
                held = self._deadlines[scope]
                if len(held) >= cap:
                    retry_after = max(1, math.ceil(min(held.values()) - now))
                    raise too_many(
                        f"{who} already holds {cap} {what} on this server; retry after {retry_after} s, or {instead}.",
                        quota=quota,
                        limit=cap,
                        used=len(held),
                        retry_after=retry_after,
                        title="Too Many Requests",
                    )
            for scope, *_ in scopes:
                self._deadlines[scope][token] = now + seconds
        try:
            yield
        finally:
            with self._lock:
                for scope, *_ in scopes:
                    held = self._deadlines[scope]
                    held.pop(token, None)
                    if not held:
                        del self._deadlines[scope]

    def waits(self) -> int:
        """Waits in progress in this process."""
        with self._lock:
            return sum(len(events) for events in self._waiters.values())

    # --- waiting --------------------------------------------------------------------------------

    def wait(
        self, job_id: str, seconds: float, finished: Callable[[], bool], registered: threading.Event | None = None
    ) -> None:
        """Return when ``finished()`` holds or ``seconds`` have passed.

        ``finished`` reads the job and ends its transaction: between two calls the waiter holds no
        database connection. It is called once at the start and once after each wake-up; with
        ``registered``, the event of an ``expecting`` block entered before the job could finish (a
        submit's, before its commit), not at the start: nothing can have finished unseen."""
        with nullcontext(registered) if registered is not None else self.expecting(job_id) as event:
            deadline = time.monotonic() + seconds
            if registered is None and finished():
                return
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not event.wait(remaining):
                    return
                event.clear()
                if finished():
                    return

    @contextmanager
    def expecting(self, job_id: str) -> Iterator[threading.Event]:
        """A waiter for ``job_id`` for the block: the event is set when the job finishes (or may have)."""
        event = threading.Event()
        with self._lock:
            self._waiters[job_id].add(event)
        try:
            yield event
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
                self._wake_streams_locked(job_id)

    # --- event streams (api.events) ---------------------------------------------------------------

    @contextmanager
    def watch(self, job_id: str) -> Iterator[tuple[threading.Event, Shared]]:
        """An event set whenever ``job_id`` changes or finishes (best effort: the stream re-reads on a timer too),
        and what the job's streams share."""
        event = threading.Event()
        with self._lock:
            self._streams[job_id].add(event)
            shared = self._shared.setdefault(job_id, Shared())
        try:
            yield event, shared
        finally:
            with self._lock:
                streams = self._streams.get(job_id)
                if streams is not None:
                    streams.discard(event)
                    if not streams:
                        del self._streams[job_id]
                        self._shared.pop(job_id, None)

    def streams(self) -> int:
        """Event streams open in this process."""
        with self._lock:
            return sum(len(events) for events in self._streams.values())

    def _wake_streams(self, job_id: str) -> None:
        with self._lock:
            self._wake_streams_locked(job_id)

    def _wake_streams_locked(self, job_id: str) -> None:
        shared = self._shared.get(job_id)
        if shared is not None:
            shared.generation += 1  # before the events: a read that starts after a wake-up is a new one
        for event in self._streams.get(job_id, ()):
            event.set()

    # --- the fast path: Redis ---------------------------------------------------------------------

    def _listen(self) -> None:
        prefix, changed = notify.channel(""), notify.changed_channel("")
        backoff = 0.5
        while True:
            client = notify.redis_client(self.settings)  # the process's bounded client; its own connection
            if client is None:
                return  # no Redis: waits end by the re-read alone
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(notify.channel("*"), notify.changed_channel("*"))
                self.subscribed.set()
                self._recheck_now.set()  # what finished while it was not subscribed is read now
                backoff = 0.5
                for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    name = message["channel"].decode()
                    if name.startswith(prefix):
                        self._wake([name[len(prefix) :]])
                    elif name.startswith(changed):
                        self._wake_streams(name[len(changed) :])
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
