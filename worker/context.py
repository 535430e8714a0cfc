"""The context a running job sees: progress, cancel/deadline checks, artifacts.

A control thread renews the job's lease every ``control_poll_seconds``, saves the
latest progress with the same UPDATE and reads the cancel flag back, so ``check()``
and ``progress()`` cost no database round trip however fast the steps are. When the job's
webhook wants ``progress`` events, the same transaction records one, at most every
``webhook_progress_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from db import transitions, webhooks
from db.models import File
from db.session import session_scope
from db.settings import Settings
from db.storage import get_storage
from worker.jobs.base import Artifact, JobError

__all__ = ["Canceled", "DeadlineExceeded", "JobContext", "JobError", "LeaseLost", "Stop"]

log = logging.getLogger(__name__)


class Stop(BaseException):
    """Ends a run early. A BaseException, so a job's ``except Exception`` cannot swallow it."""


class Canceled(Stop):
    pass


class LeaseLost(Stop):
    """This worker no longer owns the job (its lease expired and the job was requeued)."""


class DeadlineExceeded(Stop):
    pass


class JobContext:
    def __init__(
        self,
        *,
        job_id: str,
        attempt: int,
        tenant_id: str,
        worker_id: str,
        deadline_seconds: float,
        settings: Settings,
        progress_webhooks: bool = False,
    ):
        self.job_id = job_id
        self.attempt = attempt
        self.tenant_id = tenant_id
        self.worker_id = worker_id
        self.settings = settings
        self.deadline = time.monotonic() + deadline_seconds
        self.deadline_seconds = deadline_seconds
        self.stored: dict[str, dict[str, Any]] = {}  # artifacts uploaded by this run, by name
        self.models: list[dict[str, Any]] = []  # Model rows this run made (``add_model``)
        self._progress: dict[str, Any] = {"step": 0, "total": None, "fraction": 0.0, "message": None}
        self._dirty = False
        self._milestone: str | None = None
        self._cancel_requested = False
        self._progress_webhooks = progress_webhooks
        self._progress_unsent = False  # progress changed since the last progress webhook
        self._last_progress_webhook = float("-inf")
        self._lease_lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what jobs call -----------------------------------------------------
    def progress(self, step: int, total: int | None = None, message: str | None = None, **extra: Any) -> None:
        """Report progress; saved by the control thread (throttled), a new ``message`` is a timeline milestone."""
        fraction = round(min(max(step / total, 0.0), 1.0), 4) if total else 0.0
        with self._lock:
            self._progress = {"step": step, "total": total, "fraction": fraction, "message": message, **extra}
            self._dirty = True
            self._progress_unsent = True
            new_stage = message is not None and message != self._milestone
            self._milestone = message if message is not None else self._milestone
        if new_stage:
            with session_scope() as session:
                transitions.progress_milestone(session, self.job_id, self.attempt, message, {"step": step})

    def check(self) -> None:
        """Raise if the job was canceled, lost its lease or ran past its deadline."""
        if self._cancel_requested:
            raise Canceled()
        if self._lease_lost:
            raise LeaseLost()
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested or self._lease_lost

    def input_file(self, file_id: str) -> bytes:
        """The bytes of an uploaded input (checked to be the tenant's when the job was submitted)."""
        with session_scope() as session:
            file = session.get(File, file_id)
            key = file.storage_key if file is not None else None
        if key is None:
            raise JobError(f"the input file {file_id!r} no longer exists", "input_missing")
        return get_storage(self.settings).get(key)

    def store(self, name: str, data: bytes, content_type: str, key: str | None = None) -> Artifact:
        """Upload an output to ``jobs/<job id>/<name>`` (or ``key``); its row is written when the job succeeds."""
        obj = get_storage(self.settings).put(key or f"jobs/{self.job_id}/{name}", data, content_type)
        self.stored[name] = {
            "name": name, "content_type": content_type, "size": obj.size, "sha256": obj.sha256, "storage_key": obj.key
        }
        return Artifact(name=name, content_type=content_type, size=obj.size, sha256=obj.sha256)

    def add_model(self, model: dict[str, Any]) -> None:
        """A model this run made (its weights already stored): its row is written when the job succeeds."""
        self.models.append(model)

    # --- what the runner calls ------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._progress)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._control_loop, name=f"control-{self.job_id}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _control_loop(self) -> None:
        while not self._stop.wait(self.settings.control_poll_seconds):
            with self._lock:
                progress = dict(self._progress) if self._dirty else None
                self._dirty = False
                webhook = self._progress_webhook_due()
            try:
                with session_scope() as session:
                    state = transitions.renew_lease(
                        session, self.job_id, self.attempt, self.settings.lease_seconds, progress
                    )
                    if webhook and state.owned:
                        webhooks.progress_event(session, self.job_id)
            except Exception:  # the database may blip; the lease has slack for a few missed renewals
                log.exception("could not renew the lease of %s", self.job_id)
                with self._lock:
                    self._dirty = self._dirty or progress is not None
                    self._progress_unsent = self._progress_unsent or webhook
                continue
            if webhook:
                self._last_progress_webhook = time.monotonic()
            if not state.owned:
                log.warning("job %s attempt %d lost its lease", self.job_id, self.attempt)
                self._lease_lost = True
                return
            if state.cancel_requested:
                self._cancel_requested = True

    def _progress_webhook_due(self) -> bool:
        """Under the lock: whether this round records a progress webhook (throttled per job)."""
        if not (self._progress_webhooks and self._progress_unsent):
            return False
        if time.monotonic() - self._last_progress_webhook < self.settings.webhook_progress_seconds:
            return False
        self._progress_unsent = False
        return True
