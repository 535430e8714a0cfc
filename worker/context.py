"""The context a running job sees: its only door to the database and storage.

Job code reports progress, asks whether to stop, reads its inputs and the tenant's models, stores
artifacts and checkpoints, all through ``JobContext``; it never opens a session itself. A control
thread renews the job's lease every ``control_poll_seconds``, saves the latest progress with the
same UPDATE and reads the cancel flag back, so ``check()`` and ``progress()`` cost no database round
trip however fast the steps are. When the job's webhook wants ``progress`` events, the same
transaction records one, at most every ``webhook_progress_seconds``.

Storage is fenced by the attempt: every object an attempt stores is under its own number
(``jobs/<id>/<attempt>/<name>``, ``jobs/<id>/checkpoints/<attempt>/<name>``), and the attempt checks
that it still runs the job before storing and again at its next ``check()`` (or ``should_stop()``, or
store) after it, so a stale attempt (a worker that was frozen past its lease) can neither overwrite the
winner's objects nor change the timeline of a newer run, and stops at its next step. A job whose last
step is a store costs no read after it: its success is a fenced transition of its own.
A storage outage fails no job at once: an object that cannot be stored is spooled under
``<var_dir>/spool/`` and tried again with backoff while the lease is renewed, for up to
``storage_retry_window_seconds``; only then does the job fail with ``storage_error``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import tracing, transitions, webhooks
from db.models import File, Model
from db.session import session_scope
from db.settings import Settings
from db.storage import StorageError, StorageUnavailable, StoredObject, get_storage
from worker import checkpoints
from worker.checkpoints import Checkpoint
from worker.jobs.spec import Artifact, JobError

__all__ = [
    "Canceled",
    "Checkpoint",
    "DeadlineExceeded",
    "HandBack",
    "JobContext",
    "JobError",
    "LeaseLost",
    "Stop",
    "StorageGaveUp",
    "TenantModel",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Waits between two tries of a storage call during an outage: doubling from the first, capped (with
# jitter, so that the workers of a fleet do not all knock at once when S3 comes back).
STORAGE_RETRY_FIRST_DELAY = 0.5
STORAGE_RETRY_MAX_DELAY = 5.0


class Stop(BaseException):
    """Ends a run early. A BaseException, so a job's ``except Exception`` cannot swallow it."""


class Canceled(Stop):
    pass


class LeaseLost(Stop):
    """This worker no longer owns the job (its lease expired and the job was requeued)."""


class DeadlineExceeded(Stop):
    pass


class HandBack(Stop):
    """The worker is draining (SIGTERM) and gives the job back to the queue (``worker.drain``)."""


class StorageGaveUp(StorageError):
    """Storage failed for the whole ``storage_retry_window_seconds`` while the job held its lease."""

    def __init__(self, what: str, seconds: float, last: StorageError) -> None:
        super().__init__(f"could not {what} for {seconds:g} s; last error: {last}")
        self.seconds = seconds


@dataclass(frozen=True)
class TenantModel:
    """A fine-tuned model of the job's tenant, as job code sees it (no database row)."""

    id: str
    name: str
    base_model: str | None
    storage_key: str
    sha256: str


class JobContext:
    """One attempt of one job. ``clock`` and ``sessions`` are the monotonic clock and the session
    factory (replaced in unit tests)."""

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
        clock: Callable[[], float] = time.monotonic,
        sessions: Callable[[], AbstractContextManager[Session]] = session_scope,
    ):
        self.job_id = job_id
        self.attempt = attempt
        self.tenant_id = tenant_id
        self.worker_id = worker_id
        self.settings = settings
        self._clock = clock
        self._sessions = sessions
        self.deadline = clock() + deadline_seconds
        self.deadline_seconds = deadline_seconds
        self.stored: dict[str, dict[str, Any]] = {}  # artifacts uploaded by this run, by name
        self.models: list[dict[str, Any]] = []  # Model rows this run made (``add_model``)
        self._progress: dict[str, Any] = {"step": 0, "total": None, "fraction": 0.0, "message": None}
        self._dirty = False
        self._milestone: str | None = None
        self._cancel_requested = False
        self._hand_back = False  # the draining worker gives this job back at its next step
        self._progress_webhooks = progress_webhooks
        self._progress_unsent = False  # progress changed since the last progress webhook
        self._last_progress_webhook = float("-inf")
        self._lease_lost = False
        self._fence_due = False  # an object was stored since the last fenced read: the next check reads
        self._checkpoint_key: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when the lease is lost or a cancel is asked: ends a storage wait
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
        if new_stage and message is not None:
            with self._sessions() as session:
                recorded = transitions.progress_milestone(
                    session, self.job_id, self.attempt, message, {"step": step, **extra}
                )
            if not recorded:  # a stale attempt adds nothing to a newer run's timeline; it stops at its next check
                self._lost()

    def should_stop(self) -> bool:
        """Whether the run must stop now (canceled, lease lost, past its deadline), for code that must stop
        cleanly before ``check()`` raises (a pipeline's step callback, a training loop)."""
        if self._fence_due:
            self._still_owner()
        return self._cancel_requested or self._lease_lost or self._hand_back or self._clock() > self.deadline

    @property
    def handing_back(self) -> bool:
        """Whether the worker is draining and wants the job back: a job that can save its state (a fine-tune's
        checkpoint) does so before ``check()`` raises ``HandBack``."""
        return self._hand_back

    def hand_back(self) -> None:
        """Ask the run to stop at its next step and go back to the queue (called by ``worker.drain``)."""
        self._hand_back = True
        self._wake.set()

    def check(self, fence: bool = True) -> None:
        """Raise if the job was canceled, lost its lease or ran past its deadline.

        After a store, the first check reads the fence (one statement); ``fence=False`` leaves it to the
        caller's next fenced transition (the runner's check before the success, which is fenced itself)."""
        if fence and self._fence_due:
            self._still_owner()
        if self._cancel_requested:
            raise Canceled()
        if self._lease_lost:
            raise LeaseLost()
        if self._hand_back:
            raise HandBack()
        if self._clock() > self.deadline:
            raise DeadlineExceeded()

    def input_file(self, file_id: str) -> bytes:
        """The bytes of an uploaded input (checked to be the tenant's when the job was submitted)."""
        with self._sessions() as session:
            file = session.get(File, file_id)
            key = file.storage_key if file is not None else None
        if key is None:
            raise JobError(f"the input file {file_id!r} no longer exists", "input_missing")
        return self._riding_out_outages(f"read the input {key}", lambda: get_storage(self.settings).get(key))

    def tenant_models(self, model_ids: Iterable[str]) -> dict[str, TenantModel]:
        """The job's tenant's models among ``model_ids`` (another tenant's, or a deleted one, is absent)."""
        with self._sessions() as session:
            rows = session.scalars(
                select(Model).where(Model.id.in_(list(model_ids)), Model.tenant_id == self.tenant_id)
            ).all()
            return {row.id: TenantModel(row.id, row.name, row.base_model, row.storage_key, row.sha256) for row in rows}

    # --- checkpoints: scratch objects under jobs/<id>/checkpoints/<attempt>/, kept until the job succeeds ------
    def save_scratch(self, name: str, data: bytes) -> str:
        """Store ``data`` for later attempts of this job (``jobs/<id>/checkpoints/<attempt>/<name>``); its key."""
        return self._put_scratch(name, data).key

    def _put_scratch(self, name: str, data: bytes) -> StoredObject:
        return self._store_object(f"{self._scratch_prefix}{self.attempt}/{name}", data, "application/octet-stream")

    @property
    def _scratch_prefix(self) -> str:
        return f"jobs/{self.job_id}/checkpoints/"

    def load_scratch(self, key: str) -> bytes:
        """An object saved by ``save_scratch`` or ``checkpoint`` (this attempt's or an earlier one's)."""
        return self._riding_out_outages(f"read {key}", lambda: get_storage(self.settings).get(key))

    def drop_scratch(self) -> None:
        """Delete every checkpoint and scratch object of the job (its result is stored: they are spent).

        Only while this attempt runs the job: a stale attempt must not delete what the current one resumes from.
        """
        if not self._still_owner():
            return
        try:
            get_storage(self.settings).delete_prefix(self._scratch_prefix)
        except StorageError as exc:
            log.warning("job %s: could not delete its checkpoints: %s", self.job_id, exc)

    def checkpoint(self, step: int, data: bytes, **details: Any) -> str:
        """Store a checkpoint at ``step`` and record it on the timeline (only the newest is kept).

        Raises ``LeaseLost`` (or ``Canceled``) if this attempt no longer owns the job.
        """
        stored = self._put_scratch(f"step-{step:06d}.safetensors", data)
        key = stored.key
        info = {"size": stored.size, "sha256": stored.sha256, **details}
        with self._sessions() as session:
            owned = checkpoints.record(session, self.job_id, self.attempt, self.settings.lease_seconds, step, key, info)
        if not owned:
            self._lost()
            self.check()
        self._fence_due = False  # the checkpoint's record was a fenced write
        previous, self._checkpoint_key = self._checkpoint_key, key
        if previous and previous != key:
            try:
                get_storage(self.settings).delete(previous)
            except StorageError as exc:
                log.warning("job %s: could not delete the old checkpoint %s: %s", self.job_id, previous, exc)
        return key

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint an earlier attempt of this job recorded (None on a first attempt)."""
        if self.attempt == 1:
            return None
        with self._sessions() as session:
            return checkpoints.latest(session, self.job_id)

    def resumed(self, checkpoint: Checkpoint, load_seconds: float) -> None:
        """Record on the timeline that this attempt continues from ``checkpoint`` (nothing if it is stale)."""
        with self._sessions() as session:
            recorded = checkpoints.resumed(session, self.job_id, self.attempt, checkpoint, load_seconds)
        if not recorded:
            self._lost()

    # --- outputs ------------------------------------------------------------------------------------------
    @property
    def output_prefix(self) -> str:
        """Where this attempt's outputs go: ``jobs/<job id>/<attempt>/``."""
        return f"jobs/{self.job_id}/{self.attempt}/"

    def store(self, name: str, data: bytes, content_type: str, key: str | None = None) -> Artifact:
        """Upload an output to ``jobs/<job id>/<attempt>/<name>``; its row is written when the job succeeds.

        ``key`` replaces that key; it must be this attempt's alone (a fresh id, as a fine-tune's
        ``models/<new model id>/…``), never one another attempt could write. Raises ``LeaseLost`` if this
        attempt no longer runs the job, ``StorageGaveUp`` if storage failed for the whole retry window.
        """
        with tracing.span("job.upload", artifact=name, bytes=len(data)):
            obj = self._store_object(key or f"{self.output_prefix}{name}", data, content_type)
        self.stored[name] = {
            "name": name,
            "content_type": content_type,
            "size": obj.size,
            "sha256": obj.sha256,
            "storage_key": obj.key,
        }
        return Artifact(name=name, content_type=content_type, size=obj.size, sha256=obj.sha256)

    def _store_object(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Store an object for this attempt: the lease checked before (and at the next check after), an outage
        ridden out."""
        self._ensure_owner()
        storage = get_storage(self.settings)
        try:
            obj = storage.put(key, data, content_type)
        except StorageUnavailable as exc:
            spooled = self._spool(key, data)
            try:
                obj = self._riding_out_outages(
                    f"store {key}", lambda: storage.put(key, spooled.read_bytes(), content_type), first_error=exc
                )
            finally:
                spooled.unlink(missing_ok=True)
        self._fence_due = True  # read at the next check, store or transition (not here: the job may be done)
        return obj

    # --- fencing and outages ------------------------------------------------------------------------------
    def _still_owner(self) -> bool:
        """Whether this attempt still runs the job (a fenced read). A database error counts as yes: every
        write that matters is fenced again by its own transition."""
        if self._lease_lost:
            return False
        self._fence_due = False
        try:
            with self._sessions() as session:
                owned = transitions.owns(session, self.job_id, self.attempt)
        except Exception:
            log.exception("job %s: could not check the lease of attempt %d", self.job_id, self.attempt)
            return True
        if not owned:
            self._lost()
        return owned

    def _ensure_owner(self) -> None:
        if not self._still_owner():
            raise LeaseLost()

    def _lost(self) -> None:
        if not self._lease_lost:
            log.warning("job %s attempt %d no longer owns the job", self.job_id, self.attempt)
        self._lease_lost = True
        self._wake.set()

    @property
    def spool_dir(self) -> Path:
        """Where this attempt keeps outputs that storage did not take yet: ``<var_dir>/spool/<job>/<attempt>``."""
        return Path(self.settings.var_dir) / "spool" / self.job_id / str(self.attempt)

    def _spool(self, key: str, data: bytes) -> Path:
        path = self.spool_dir / key.replace("/", "__")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def _riding_out_outages(self, what: str, call: Callable[[], T], first_error: StorageUnavailable | None = None) -> T:
        """``call()``, tried again with backoff while storage is unavailable, this attempt runs the job and
        ``storage_retry_window_seconds`` have not passed since the first failure. The control thread keeps
        renewing the lease meanwhile; a lost lease or a cancel ends the wait at once. Time spent waiting is
        added to the job's deadline (an outage is not run time). Other storage errors are raised at once."""
        window = self.settings.storage_retry_window_seconds
        started = self._clock()
        last = first_error
        if last is None:
            try:
                return call()
            except StorageUnavailable as exc:
                last = exc
        log.warning("job %s: could not %s (%s); trying again for up to %g s", self.job_id, what, last, window)
        delay, tries = STORAGE_RETRY_FIRST_DELAY, 1
        while True:
            left = started + window - self._clock()
            if left <= 0:
                raise StorageGaveUp(what, window, last)
            self._wake.wait(min(delay * random.uniform(0.75, 1.0), left))
            if self._lease_lost:
                raise LeaseLost()
            if self._cancel_requested:
                raise Canceled()
            if self._hand_back:
                raise HandBack()
            tries += 1
            try:
                result = call()
            except StorageUnavailable as exc:
                last, delay = exc, min(delay * 2, STORAGE_RETRY_MAX_DELAY)
                log.info("job %s: could not %s (try %d): %s", self.job_id, what, tries, exc)
                continue
            waited = self._clock() - started
            self.deadline += waited
            log.warning("job %s: %s done after %d tries in %.1f s", self.job_id, what, tries, waited)
            return result

    def add_model(self, model: dict[str, Any]) -> None:
        """A model this run made (its weights already stored): its row is written when the job succeeds."""
        self.models.append(model)

    # --- what the runner calls ------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._progress)

    def start(self) -> None:
        # In a copy of this thread's context: the control thread's log lines carry the job id and attempt too.
        run = contextvars.copy_context().run
        self._thread = threading.Thread(
            target=run, args=(self._control_loop,), name=f"control-{self.job_id}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._clear_spool()

    def _clear_spool(self) -> None:
        """Remove what this attempt left in the spool (it ended before storage took it: spent), and what an
        earlier attempt of the job left here if its worker process died."""
        job_spool = self.spool_dir.parent
        if not job_spool.exists():
            return
        for folder in job_spool.iterdir():
            if folder.name.isdigit() and int(folder.name) <= self.attempt:
                shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            job_spool.rmdir()  # unless another attempt of the job spools here

    def _control_loop(self) -> None:
        while not self._stop.wait(self.settings.control_poll_seconds):
            with self._lock:
                progress = dict(self._progress) if self._dirty else None
                self._dirty = False
                webhook = self._progress_webhook_due()
            try:
                with self._sessions() as session:
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
                self._last_progress_webhook = self._clock()
            if not state.owned:
                log.warning("job %s attempt %d lost its lease", self.job_id, self.attempt)
                self._lost()
                return
            if state.cancel_requested:
                self._cancel_requested = True
                self._wake.set()

    def _progress_webhook_due(self) -> bool:
        """Under the lock: whether this round records a progress webhook (throttled per job)."""
        if not (self._progress_webhooks and self._progress_unsent):
            return False
        if self._clock() - self._last_progress_webhook < self.settings.webhook_progress_seconds:
            return False
        self._progress_unsent = False
        return True
