"""Celery tasks: thin shells that take an id and call one function."""

from __future__ import annotations

import logging

from celery.signals import celeryd_after_setup, worker_process_init, worker_ready, worker_shutdown
from sqlalchemy import text

from db import notify
from db.session import dispose_engines, get_engine
from db.settings import get_settings
from db.storage import get_storage
from worker import reconciler, runner, webhooks
from worker.celery_app import RECONCILE, RUN_JOB, SEND_WEBHOOKS, SWEEP_WEBHOOKS, app
from worker.heartbeat import Heartbeat


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked pool child must not share its parent's database sockets.
    dispose_engines()


_heartbeat: Heartbeat | None = None
_queues: list[str] = []


@celeryd_after_setup.connect
def _remember_queues(sender: str, instance, **_: object) -> None:  # type: ignore[no-untyped-def]
    _queues[:] = sorted(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    runner.name_worker(sender)


@worker_ready.connect
def _warm_up(**_: object) -> None:
    # Open the database, storage and Redis clients now, so the first job does not pay for it.
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        get_storage().ensure_bucket()
        client = notify.redis_client()
        if client is not None:
            client.ping()
    except Exception as exc:  # not fatal: jobs retry these connections themselves
        logging.getLogger(__name__).warning("warm-up incomplete: %s", exc)
    _preload()
    global _heartbeat
    _heartbeat = Heartbeat(runner.worker_id(), _queues)
    _heartbeat.start()


def _preload() -> None:
    names = get_settings().preload_models
    if not names:
        return
    from worker.models.preload import preload

    preload(names)


@worker_shutdown.connect
def _goodbye(**_: object) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    return runner.execute(job_id)


@app.task(name=RECONCILE, ignore_result=True)
def reconcile() -> dict[str, int]:
    report = reconciler.reconcile()
    reconciler.follow_up(report)
    return report.counts()


@app.task(name=SEND_WEBHOOKS, ignore_result=True)
def send_webhooks(job_id: str) -> list[str]:
    return webhooks.send_due(job_id)


@app.task(name=SWEEP_WEBHOOKS, ignore_result=True)
def sweep_webhooks() -> int:
    return len(webhooks.sweep())
