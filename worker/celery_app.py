"""The Celery app: configured from settings, never from constants in code.

Importing this module is cheap (no torch): the API uses ``dispatch`` to send job ids.
"""

from __future__ import annotations

from celery import Celery

from db.settings import get_settings

RUN_JOB = "gpujobs.run_job"
RECONCILE = "gpujobs.reconcile"


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("gpujobs", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        # A message is acked only after the job ran; a worker that dies gives it back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Leases (seconds) do the real recovery; the broker must never redeliver a running job on its own.
        broker_transport_options={
            "visibility_timeout": 12 * 3600,
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
        },
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # state lives in the database, not in a result backend
        result_backend=None,
        worker_send_task_events=True,  # so Flower works against our workers too
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        task_default_queue="gpu",
        task_create_missing_queues=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        beat_schedule={
            "reconcile": {
                "task": RECONCILE,
                "schedule": settings.reconcile_interval_seconds,
                "options": {"queue": "maintenance", "expires": max(settings.reconcile_interval_seconds * 2, 5)},
            }
        },
    )
    return app


app = make_celery()


def dispatch(job_id: str, queue: str) -> None:
    """Send a job id to its queue; raises if the broker does not take it (the reconciler retries)."""
    app.send_task(RUN_JOB, args=[job_id], queue=queue, retry=False)
