"""The worker and beat processes' Celery app: thin tasks that take an id and call one function.

``worker_app(settings)`` builds it explicitly (``gpujobs worker`` and ``gpujobs beat`` call it):
the tasks are registered on the process's app, the worker's lifecycle signals connected and the
process hooks installed. Importing this module registers nothing.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from celery import Celery, bootsteps
from celery.signals import (
    celeryd_after_setup,
    setup_logging,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.worker import WorkController
from celery.worker.request import Request
from sqlalchemy import text

from db import logs, notify, tracing
from db.session import dispose_engines, get_engine
from db.settings import Settings, get_settings
from db.storage import get_storage
from worker import dispatcher, metrics, reconciler, retention, runner, webhooks
from worker.celery_app import RECONCILE, RETENTION, RUN_JOB, SEND_WEBHOOKS, SWEEP_WEBHOOKS, producer
from worker.drain import DRAIN
from worker.heartbeat import Heartbeat
from worker.hooks import install_hooks
from worker.warm import configure_compile_cache

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """The job ended ``failed``: raised so that Celery, and so Flower, count its task as failed.

    Listed in the task's ``throws``: Celery logs it in one info line, without a traceback (the job's own
    error is in its row and was logged by the runner)."""


class JobRequest(Request):
    """The run_job task's worker request: a job that ended ``canceled`` is a revoked task in the events.

    Celery would send ``task-succeeded`` for it (the task returned); Flower's state then says SUCCESS for
    a job nobody ran to the end. The task's return value is the outcome, so the event is swapped here."""

    def send_event(self, type: str, **fields: Any) -> None:
        # The worker's tracer hands over the return value's repr: "'canceled'".
        if type == "task-succeeded" and fields.get("result") in (CANCELED, repr(CANCELED)):
            type, fields = "task-revoked", {"terminated": False, "signum": None, "expired": False}
        super().send_event(type, **fields)


CANCELED = "canceled"  # runner.execute's outcome for a job that ended canceled


class UnbufferedTaskEvents(bootsteps.StartStopStep):
    """Task events are published when they happen, not buffered: Celery 5.6 loses buffered ones.

    With an event loop, the consumer's event dispatcher buffers ``task-*`` events and asks the loop to
    flush them. Our pools are threads, so the task's own events are appended from a pool thread while
    the loop thread flushes: ``flush`` publishes the list and then empties it, dropping what a thread
    appended in between, and the flush request is added to the hub's ready set without its lock, so it
    can be lost too (celery/celery#10434; the first half is fixed after 5.6.3, the second is not).
    Flower then shows a finished job as RECEIVED or STARTED forever. ``publish`` holds the dispatcher's
    mutex, so unbuffered sends from any thread are safe; task events are off unless a monitor enables
    them, so the extra broker writes cost nothing by default. Runs after the Events step at every
    consumer (re)start, which builds a new dispatcher."""

    requires = ("celery.worker.consumer.events:Events",)

    def start(self, c: Any) -> None:
        if c.event_dispatcher is not None:
            c.event_dispatcher.buffer_group = frozenset()
            c.event_dispatcher.on_send_buffered = None


def run_job(job_id: str) -> str:
    outcome = runner.execute(job_id)
    if outcome == "failed":
        raise JobFailed(f"job {job_id} failed (its error: GET /v1/jobs/{job_id})")
    return outcome


def reconcile() -> dict[str, int]:
    report = reconciler.reconcile()
    reconciler.follow_up(report)
    return report.counts()


def send_webhooks(hint: str) -> int:
    """Wake this process's webhook senders (``hint``, a job or endpoint id, only names the cause in logs)."""
    return webhooks.PUMP.kick()


def sweep_webhooks() -> int:
    return len(webhooks.sweep())


def expire_and_purge() -> dict[str, int]:
    return retention.run().counts()


def worker_app(settings: Settings | None = None) -> Celery:
    """The Celery app a worker or beat process runs, with its tasks, signals and hooks in place."""
    settings = settings or get_settings()
    tracing.configure(logs.role(), settings.trace_file)
    app = producer(settings)
    if RUN_JOB not in app.tasks:
        app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, throws=(JobFailed,), Request=JobRequest)(
            run_job
        )
        # The maintenance tasks run every few seconds: no task events, so Flower's list shows jobs only.
        routine = {"ignore_result": True, "send_events": False}
        app.task(name=RECONCILE, **routine)(reconcile)
        app.task(name=SEND_WEBHOOKS, **routine)(send_webhooks)
        app.task(name=SWEEP_WEBHOOKS, **routine)(sweep_webhooks)
        app.task(name=RETENTION, **routine)(expire_and_purge)
    if UnbufferedTaskEvents not in app.steps["consumer"]:
        app.steps["consumer"].add(UnbufferedTaskEvents)
    # Celery's worker internals still reach for ``current_app`` in places (as ``celery -A`` would set it).
    app.set_current()
    app.set_default()
    _lifecycle.connect()
    install_hooks(settings)
    return app


class _Lifecycle:
    """What a worker process does at start and stop: fresh connections, warm-up, preload, heartbeat, drain."""

    def __init__(self) -> None:
        self.heartbeat: Heartbeat | None = None
        self.queues: list[str] = []
        self.slots = 1

    def connect(self) -> None:
        # Celery keeps weak references by default: these are bound methods of a module-level object.
        # Celery leaves the root logger alone when this signal has a receiver: db.logs sets it up.
        setup_logging.connect(self.logging, weak=False, dispatch_uid="gpujobs.logging")
        worker_process_init.connect(self.fresh_connections, weak=False, dispatch_uid="gpujobs.fresh")
        celeryd_after_setup.connect(self.remember_queues, weak=False, dispatch_uid="gpujobs.queues")
        worker_ready.connect(self.warm_up, weak=False, dispatch_uid="gpujobs.warm_up")
        worker_shutting_down.connect(self.drain, weak=False, dispatch_uid="gpujobs.drain")
        worker_shutdown.connect(self.goodbye, weak=False, dispatch_uid="gpujobs.goodbye")

    def logging(self, loglevel: int | str | None = None, **_: object) -> None:
        # `gpujobs worker|beat` configured it already; `celery -A worker.main worker` did not.
        if not logs.configured():
            logs.configure("worker", loglevel or "INFO")

    def fresh_connections(self, **_: object) -> None:
        # A forked pool child must not share its parent's database sockets.
        dispose_engines()

    def remember_queues(self, sender: str, instance: WorkController, **_: object) -> None:
        queues = instance.app.amqp.queues
        self.queues = sorted(queues.consume_from or queues)
        self.slots = int(instance.concurrency or 1)
        runner.name_worker(sender)

    def warm_up(self, **_: object) -> None:
        # A worker's, not beat's: before the preload or a job imports torch's compiler, which reads it.
        configure_compile_cache(get_settings())
        # Open the database, storage and Redis clients now, so the first job does not pay for it.
        try:
            with get_engine().connect() as connection:
                connection.execute(text("SELECT 1"))
            get_storage().ensure_bucket()
            client = notify.redis_client()
            if client is not None:
                client.ping()
        except Exception as exc:  # not fatal: jobs retry these connections themselves
            log.warning("warm-up incomplete: %s", exc)
        settings = get_settings()
        serve_metrics(settings, self.queues)
        self.heartbeat = Heartbeat(runner.worker_id(), self.queues, self.slots, warming=bool(settings.preload_models))
        self.heartbeat.start()
        if settings.preload_models:  # the heartbeat says `warming`; the scheduler sends nothing meanwhile
            from worker.warm import preload_and_warm

            preload_and_warm(settings)
            self.heartbeat.warmed()
        # Its slots count from this first heartbeat on: send it what waits for them.
        dispatcher.dispatch_all([queue for queue in self.queues if queue in dispatcher.JOB_QUEUES])
        hurry_first(signal.SIGQUIT, signal.SIGINT)

    def drain(self, sig: str = "SIGTERM", how: str = "Warm", **_: object) -> None:
        """Celery's shutdown signal handler (it runs in the main thread, in the signal handler: no I/O here).

        The first SIGTERM or SIGINT begins the drain (``worker.drain``); another one, or a cold shutdown,
        hands the running jobs back at once."""
        began = DRAIN.begin(get_settings().worker_drain_seconds, self.stopped)
        if how == "Cold" and began:
            DRAIN.hurry()
        # Celery swaps its SIGINT handler for its cold-shutdown one now; keep ours in front of it.
        hurry_first(signal.SIGQUIT, signal.SIGINT)

    def stopped(self) -> None:
        # The worker serves no queue from now on: its consumers drop out of /metrics at once.
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def goodbye(self, **_: object) -> None:
        if DRAIN.active:  # the pool is empty: the drain thread ends at its next look (and logs how it went)
            DRAIN.wait(timeout=2.0)
        if self.heartbeat is not None:
            self.heartbeat.stop()


def serve_metrics(settings: Settings, queues: list[str]) -> None:
    """This worker's own ``/metrics`` on ``worker_metrics_port`` (0: none). A port already taken is logged,
    not fatal: the worker's jobs matter more than its numbers."""
    if not settings.worker_metrics_port:
        return
    try:
        metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host, queues)
    except OSError as exc:
        log.error("metrics port %d: %s; this worker serves no /metrics", settings.worker_metrics_port, exc)


def hurry_first(*signals: signal.Signals) -> None:
    """Put a drain hurry in front of Celery's handlers of ``signals``.

    Celery's cold shutdown (SIGQUIT, a second SIGINT) blocks in its handler until the running tasks end,
    before it tells anyone: the hand-back must be asked first, or the drain would wait its whole window.
    A SIGINT that comes first is a warm shutdown (the drain begins through ``worker_shutting_down``)."""
    for sig in signals:
        previous = signal.getsignal(sig)
        if getattr(previous, "gpujobs_hurry", False) or not callable(previous):
            continue

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            if signum == signal.SIGQUIT or DRAIN.active:
                DRAIN.begin(get_settings().worker_drain_seconds, _lifecycle.stopped)
                DRAIN.hurry()
            previous(signum, frame)

        handler.gpujobs_hurry = True  # type: ignore[attr-defined]
        signal.signal(sig, handler)


_lifecycle = _Lifecycle()
