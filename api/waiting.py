"""``Prefer: wait``: hold a request until its job finishes, without a Redis connection per request.

One listener thread per API process subscribes to every job's finish channel and wakes
the waiting requests. The database stays the truth: a waiter reads the job's status once
when it starts, after every wake-up, and at least once a second in case a message was
missed (or Redis is down, in which case it simply polls).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import redis

from db import notify
from db.settings import Settings

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0


class FinishListener:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._waiters: dict[str, set[threading.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._listen, name="finish-listener", daemon=True)
        self._thread.start()

    def wait(self, job_id: str, seconds: float, finished: Callable[[], bool]) -> None:
        """Return when ``finished()`` holds or ``seconds`` have passed."""
        event = threading.Event()
        with self._lock:
            self._waiters[job_id].add(event)
        try:
            deadline = time.monotonic() + seconds
            while not finished():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                event.wait(min(remaining, RECHECK_SECONDS))
                event.clear()
        finally:
            with self._lock:
                waiters = self._waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[job_id]

    def _wake(self, job_id: str) -> None:
        with self._lock:
            for event in self._waiters.get(job_id, ()):
                event.set()

    def _listen(self) -> None:
        pattern = notify.channel("*")
        prefix = notify.channel("")
        backoff = 0.5
        while True:
            client = notify.redis_client(self.settings)
            if client is None:
                return  # no Redis: waiters poll the database once a second
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(pattern)
                backoff = 0.5
                for message in pubsub.listen():
                    if message.get("type") == "pmessage":
                        self._wake(message["channel"].decode()[len(prefix) :])
            except redis.RedisError as exc:
                log.warning("finish listener lost Redis (%s); retrying in %.1f s", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


_listener: FinishListener | None = None
_listener_lock = threading.Lock()


def listener(settings: Settings) -> FinishListener:
    global _listener
    with _listener_lock:
        if _listener is None:
            _listener = FinishListener(settings)
        return _listener
