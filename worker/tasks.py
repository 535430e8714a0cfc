"""Celery tasks: thin shells that take an id and call one function."""

from __future__ import annotations

import logging

from celery.signals import worker_process_init, worker_ready
from sqlalchemy import text

from db import notify
from db.session import dispose_engines, get_engine
from db.storage import get_storage
from worker import reconciler, runner
from worker.celery_app import RECONCILE, RUN_JOB, app


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked pool child must not share its parent's database sockets.
    dispose_engines()


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


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    return runner.execute(job_id)


@app.task(name=RECONCILE, ignore_result=True)
def reconcile() -> dict[str, int]:
    report = reconciler.reconcile()
    return {name: len(ids) for name, ids in vars(report).items()}
