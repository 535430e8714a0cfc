"""The worker and beat processes' Celery app: thin tasks that take an id and call one function.

``worker_app(settings)`` builds it explicitly (``gpujobs worker`` and ``gpujobs beat`` call it):
the tasks are registered on the process's app, the worker's lifecycle signals connected and the
process hooks installed. Importing this module registers nothing.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from celery import Celery
from celery.signals import (
    celeryd_after_setup,
    worker_process_init,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.worker import WorkController
from sqlalchemy import text

from db import notify
from db.session import dispose_engines, get_engine
from db.settings import Settings, get_settings
from db.storage import get_storage
from worker import reconciler, runner, webhooks
from worker.celery_app import RECONCILE, RUN_JOB, SEND_WEBHOOKS, SWEEP_WEBHOOKS, producer
from worker.drain import DRAIN
from worker.heartbeat import Heartbeat
from worker.hooks import install_hooks

log = logging.getLogger(__name__)


def run_job(job_id: str) -> str:
    return runner.execute(job_id)


def reconcile() -> dict[str, int]:
    report = reconciler.reconcile()
    reconciler.follow_up(report)
    return report.counts()


def send_webhooks(job_id: str) -> list[str]:
    return webhooks.send_due(job_id)


def sweep_webhooks() -> int:
    return len(webhooks.sweep())


def worker_app(settings: Settings | None = None) -> Celery:
    """The Celery app a worker or beat process runs, with its tasks, signals and hooks in place."""
    settings = settings or get_settings()
    app = producer(settings)
    if RUN_JOB not in app.tasks:
        app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)(run_job)
        app.task(name=RECONCILE, ignore_result=True)(reconcile)
        app.task(name=SEND_WEBHOOKS, ignore_result=True)(send_webhooks)
        app.task(name=SWEEP_WEBHOOKS, ignore_result=True)(sweep_webhooks)
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

    def connect(self) -> None:
        # Celery keeps weak references by default: these are bound methods of a module-level object.
        worker_process_init.connect(self.fresh_connections, weak=False, dispatch_uid="gpujobs.fresh")
        celeryd_after_setup.connect(self.remember_queues, weak=False, dispatch_uid="gpujobs.queues")
        worker_ready.connect(self.warm_up, weak=False, dispatch_uid="gpujobs.warm_up")
        worker_shutting_down.connect(self.drain, weak=False, dispatch_uid="gpujobs.drain")
        worker_shutdown.connect(self.goodbye, weak=False, dispatch_uid="gpujobs.goodbye")

    def fresh_connections(self, **_: object) -> None:
        # A forked pool child must not share its parent's database sockets.
        dispose_engines()

    def remember_queues(self, sender: str, instance: WorkController, **_: object) -> None:
        queues = instance.app.amqp.queues
        self.queues = sorted(queues.consume_from or queues)
        runner.name_worker(sender)

    def warm_up(self, **_: object) -> None:
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
        names = get_settings().preload_models
        if names:
            from worker.models.preload import preload

            preload(names)
        self.heartbeat = Heartbeat(runner.worker_id(), self.queues)
        self.heartbeat.start()
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
