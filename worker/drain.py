"""Graceful drain: what a worker process does between SIGTERM and its exit.

A rolling update, a scale-down or a spot reclaim sends SIGTERM. Celery's answer (a warm shutdown)
stops consuming and waits for the running tasks, however long they take; the orchestrator then
SIGKILLs the process at the end of its grace period, and the job waits for its lease to expire
before anyone runs it again. The drain bounds that wait:

1. at the first SIGTERM (or SIGINT) the worker takes no new job (Celery stops consuming; a message
   it had already taken is sent back to the queue unclaimed, see ``runner.execute``), and the
   heartbeat marks the worker stopped, so its queues lose a consumer at once (``/metrics``);
2. running jobs may finish for up to ``worker_drain_seconds``;
3. each job still running then is asked to hand itself back: it stops at its next step (the same
   ``check()`` a cancel uses; a fine-tune stores a checkpoint first), and the runner puts it back to
   ``queued`` with a fenced transition (``transitions.hand_back``) and sends its message at once, so
   another worker runs it within moments instead of a lease later;
4. the tasks return, Celery's pool empties and the process exits.

A second SIGTERM or a SIGINT during the drain, or a SIGQUIT at any time, ends the wait: the jobs are
handed back at once. The database stays the truth throughout: a hand-back is a conditional UPDATE of
this attempt only, and a worker killed in the middle of it leaves a job whose lease expires as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05  # how often the drain looks whether its jobs have finished


class Handable(Protocol):
    """What the drain needs of a running job (``JobContext``)."""

    job_id: str

    def hand_back(self) -> None: ...


class Drain:
    """The drain of this process: the running jobs it tracks, when it began, whether to hurry."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._running: set[Handable] = set()
        self._began: float | None = None
        self._handing_back = False
        self._hurry = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """Whether the drain began: the worker takes no new job."""
        return self._began is not None

    @property
    def handing_back(self) -> bool:
        return self._handing_back

    def started(self, job: Handable) -> None:
        """A job started running here; if the drain already hands jobs back, so is this one, at once."""
        with self._lock:
            self._running.add(job)
            late = self._handing_back
        if late:
            job.hand_back()

    def ended(self, job: Handable) -> None:
        with self._lock:
            self._running.discard(job)

    def running(self) -> list[str]:
        with self._lock:
            return sorted(job.job_id for job in self._running)

    def begin(self, window: float, on_begin: Callable[[], None] = lambda: None) -> bool:
        """Start draining (``window`` seconds for the running jobs to finish); a later call hurries it.

        Cheap and non-blocking, and it logs nothing (a signal handler calls it): the waiting, ``on_begin``
        and the logging happen in a thread of its own. True if this call began the drain."""
        with self._lock:
            if self._began is not None:
                first = False
            else:
                first, self._began = True, self._clock()
        if not first:
            self.hurry()
            return False
        self._thread = threading.Thread(target=self._run, args=(window, on_begin), name="drain", daemon=True)
        self._thread.start()
        return True

    def hurry(self) -> None:
        """Hand the running jobs back now (begins a drain with no window if none began)."""
        if self._began is None:
            self.begin(0.0)
        self._hurry.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Until the drain handed back what it had to (or found nothing to); for tests and shutdown."""
        return self._done.wait(timeout)

    def _run(self, window: float, on_begin: Callable[[], None]) -> None:
        log.warning("draining: no new jobs; running jobs get %g s to finish, then are handed back", window)
        try:
            on_begin()
        except Exception:  # the drain itself must go on (the heartbeat may fail with the database away)
            log.exception("drain: could not mark the worker stopped")
        assert self._began is not None
        deadline = self._began + window
        while self.running() and not self._hurry.is_set():
            left = deadline - self._clock()
            if left <= 0:
                break
            self._hurry.wait(min(left, POLL_SECONDS))
        if self._hurry.is_set():
            log.warning("drain cut short (another signal): handing the running jobs back now")
        with self._lock:
            self._handing_back = True
            jobs = list(self._running)
        for job in jobs:
            log.warning("drain: handing job %s back to the queue", job.job_id)
            job.hand_back()
        if not jobs:
            log.info("drain: every running job finished within the window")
        self._done.set()


DRAIN = Drain()  # the process's drain (one worker process, one drain)
