"""The Celery app, built from settings by ``make_celery``; nothing is built or configured at import.

Every process that sends tasks (the API, workers, beat) gets its producer from ``producer(settings)``
(one per broker URL); the worker and beat processes also register the tasks (``worker.tasks``).
Importing this module is cheap (no torch): the API uses ``dispatch`` to send job ids.
"""

from __future__ import annotations

import threading

from celery import Celery

from db import tracing
from db.settings import Settings, get_settings
from worker.jobs.spec import Queue

RUN_JOB = "gpujobs.run_job"
RECONCILE = "gpujobs.reconcile"
SEND_WEBHOOKS = "gpujobs.send_webhooks"
SWEEP_WEBHOOKS = "gpujobs.sweep_webhooks"
RETENTION = "gpujobs.retention"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``' broker, configured as every gpujobs process needs it (no tasks yet)."""
    app = Celery("gpujobs", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        # A message is acked only after the job ran; a worker that dies gives it back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Leases (seconds) do the real recovery; the broker must never redeliver a running job on its own.
        broker_transport_options={
            "visibility_timeout": 12 * 3600,
            "socket_connect_timeout": settings.broker_timeout_seconds,
            "socket_timeout": settings.broker_timeout_seconds,
        },
        broker_connection_timeout=settings.broker_timeout_seconds,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # state lives in the database, not in a result backend
        result_backend=None,
        # Task events cost three broker writes per job; Flower turns them on by remote control when it runs.
        worker_send_task_events=settings.worker_task_events,
        # No task-sent events: they would double the API's broker writes; workers' events suffice for Flower.
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        task_default_queue=Queue.GPU.value,
        task_create_missing_queues=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        beat_schedule={
            "reconcile": {
                "task": RECONCILE,
                "schedule": settings.reconcile_interval_seconds,
                "options": {
                    "queue": Queue.MAINTENANCE.value,
                    "expires": max(settings.reconcile_interval_seconds * 2, 5),
                },
            },
            # Retries are scheduled in the database (next_attempt_at); this finds the due ones.
            "sweep-webhooks": {
                "task": SWEEP_WEBHOOKS,
                "schedule": settings.webhook_sweep_seconds,
                "options": {"queue": Queue.WEBHOOKS.value, "expires": max(settings.webhook_sweep_seconds * 2, 5)},
            },
            # Expired outputs and old jobs (worker/retention.py); does nothing while both are kept forever.
            "retention": {
                "task": RETENTION,
                "schedule": settings.retention_interval_seconds,
                "options": {
                    "queue": Queue.MAINTENANCE.value,
                    "expires": max(settings.retention_interval_seconds * 2, 5),
                },
            },
        },
    )
    return app


_producers: dict[str, Celery] = {}
_producers_lock = threading.Lock()


def producer(settings: Settings | None = None) -> Celery:
    """This process's Celery app for ``settings``' broker (default: the process settings), made once."""
    settings = settings or get_settings()
    with _producers_lock:
        app = _producers.get(settings.broker_url)
        if app is None:
            app = _producers[settings.broker_url] = make_celery(settings)
        return app


def queue_depths(settings: Settings | None = None) -> dict[str, int]:
    """Messages waiting in each queue, as the broker counts them (what autoscalers need)."""
    depths = {}
    with producer(settings).connection_for_write() as connection:
        channel = connection.default_channel
        for queue in Queue:
            try:
                depths[queue.value] = channel.queue_declare(queue=queue.value, passive=True).message_count
            except Exception:  # a queue nobody declared yet holds nothing (AMQP raises, and closes the channel)
                depths[queue.value] = 0
                channel = connection.channel()
    return depths


def dispatch(job_id: str, queue: str, settings: Settings | None = None) -> None:
    """Send a job id to its queue; raises if the broker does not take it (the reconciler retries)."""
    with tracing.span("job.dispatch", tracing.job_traceparent(job_id), job_id=job_id, queue=queue):
        producer(settings).send_task(RUN_JOB, args=[job_id], queue=queue, retry=False)


def schedule_reconcile(countdown: float, expires: float, settings: Settings | None = None) -> None:
    """Ask a maintenance worker for one reconcile ``countdown`` seconds from now (besides beat's)."""
    producer(settings).send_task(
        RECONCILE, queue=Queue.MAINTENANCE.value, countdown=countdown, expires=expires, retry=False
    )


def send_webhooks(
    hint: str, countdown: float | None = None, expires: float | None = None, settings: Settings | None = None
) -> None:
    """Wake a webhooks worker's senders: due deliveries go, fairly between endpoints (best effort: the beat
    sweep wakes them too). ``hint`` (the job or endpoint that has one due) only shows in the logs."""
    producer(settings).send_task(
        SEND_WEBHOOKS, args=[hint], queue=Queue.WEBHOOKS.value, countdown=countdown, expires=expires, retry=False
    )
