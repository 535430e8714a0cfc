"""The worker and beat processes' Celery app: thin tasks that take an id and call one function.

``worker_app(settings)`` builds it explicitly (``gpujobs worker`` and ``gpujobs beat`` call it):
the tasks are registered on the process's app, the worker's lifecycle signals connected and the
process hooks installed. Importing this module registers nothing.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_init, worker_ready, worker_shutdown
from celery.worker import WorkController
from sqlalchemy import text

from db import notify
from db.session import dispose_engines, get_engine
from db.settings import Settings, get_settings
from db.storage import get_storage
from worker import reconciler, runner, webhooks
from worker.celery_app import RECONCILE, RUN_JOB, SEND_WEBHOOKS, SWEEP_WEBHOOKS, producer
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
    """What a worker process does at start and stop: fresh connections, warm-up, preload, heartbeat."""

    def __init__(self) -> None:
        self.heartbeat: Heartbeat | None = None
        self.queues: list[str] = []

    def connect(self) -> None:
        # Celery keeps weak references by default: these are bound methods of a module-level object.
        worker_process_init.connect(self.fresh_connections, weak=False, dispatch_uid="gpujobs.fresh")
        celeryd_after_setup.connect(self.remember_queues, weak=False, dispatch_uid="gpujobs.queues")
        worker_ready.connect(self.warm_up, weak=False, dispatch_uid="gpujobs.warm_up")
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

    def goodbye(self, **_: object) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()


_lifecycle = _Lifecycle()
