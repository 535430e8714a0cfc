"""The Celery app: configured from settings, never from constants in code.

Importing this module is cheap (no torch): the API uses ``dispatch`` to send job ids.
"""

from __future__ import annotations

from celery import Celery

from db import webhooks
from db.settings import get_settings

RUN_JOB = "gpujobs.run_job"
RECONCILE = "gpujobs.reconcile"
SEND_WEBHOOKS = "gpujobs.send_webhooks"
SWEEP_WEBHOOKS = "gpujobs.sweep_webhooks"
WEBHOOKS_QUEUE = "webhooks"
MAINTENANCE_QUEUE = "maintenance"


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
        # No task-sent events: they would double the API's broker writes; workers' events suffice for Flower.
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        task_default_queue="gpu",
        task_create_missing_queues=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        beat_schedule={
            "reconcile": {
                "task": RECONCILE,
                "schedule": settings.reconcile_interval_seconds,
                "options": {"queue": MAINTENANCE_QUEUE, "expires": max(settings.reconcile_interval_seconds * 2, 5)},
            },
            # Retries are scheduled in the database (next_attempt_at); this finds the due ones.
            "sweep-webhooks": {
                "task": SWEEP_WEBHOOKS,
                "schedule": settings.webhook_sweep_seconds,
                "options": {"queue": WEBHOOKS_QUEUE, "expires": max(settings.webhook_sweep_seconds * 2, 5)},
            },
        },
    )
    return app


app = make_celery()


QUEUES = ("gpu", "train", "webhooks", "maintenance")


def queue_depths() -> dict[str, int]:
    """Messages waiting in each queue, as the broker counts them (what autoscalers need)."""
    depths = {}
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in QUEUES:
            try:
                depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except Exception:  # a queue nobody declared yet holds nothing (AMQP raises, and closes the channel)
                depths[queue] = 0
                channel = connection.channel()
    return depths


_producers: dict[str, Celery] = {}


def _producer(broker_url: str) -> Celery:
    producer = Celery("gpujobs", broker=broker_url)
    producer.conf.update(
        broker_transport_options=app.conf.broker_transport_options,
        broker_connection_timeout=app.conf.broker_connection_timeout,
    )
    return producer


def dispatch(job_id: str, queue: str, broker_url: str | None = None) -> None:
    """Send a job id to its queue; raises if the broker does not take it (the reconciler retries)."""
    producer = app
    if broker_url and broker_url != app.conf.broker_url:  # an API app built with other settings
        producer = _producers.setdefault(broker_url, _producer(broker_url))
    producer.send_task(RUN_JOB, args=[job_id], queue=queue, retry=False)


def schedule_reconcile(countdown: float, expires: float) -> None:
    """Ask a maintenance worker for one reconcile ``countdown`` seconds from now (besides beat's)."""
    app.send_task(RECONCILE, queue=MAINTENANCE_QUEUE, countdown=countdown, expires=expires, retry=False)


def send_webhooks(job_id: str, countdown: float | None = None, expires: float | None = None) -> None:
    """Ask a webhooks worker to send the job's due deliveries (best effort: the beat sweep finds them too)."""
    app.send_task(
        SEND_WEBHOOKS, args=[job_id], queue=WEBHOOKS_QUEUE, countdown=countdown, expires=expires, retry=False
    )


# Every commit that records webhook deliveries (in any process that sends tasks) enqueues their sending.
webhooks.send_after_commit(send_webhooks)
