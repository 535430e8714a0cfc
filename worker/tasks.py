"""Celery tasks: thin shells that take an id and call one function."""

from __future__ import annotations

from celery.signals import worker_process_init

from db.session import dispose_engines
from worker import reconciler, runner
from worker.celery_app import RECONCILE, RUN_JOB, app


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked pool child must not share its parent's database sockets.
    dispose_engines()


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    return runner.execute(job_id)


@app.task(name=RECONCILE, ignore_result=True)
def reconcile() -> dict[str, int]:
    report = reconciler.reconcile()
    return {name: len(ids) for name, ids in vars(report).items()}
