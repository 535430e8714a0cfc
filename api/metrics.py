"""``GET /metrics`` (this API server's processes) and ``GET /metrics/cluster`` (the whole system, once).

Two endpoints because they answer two questions. ``/metrics`` is the API server's own counters and
histograms (HTTP requests, jobs submitted, ``process_*``, build info; ``api.instruments``): every
replica has its own, and Prometheus sums them. ``/metrics/cluster`` is computed at scrape time from
the database (and the broker, for queue depths): jobs by type and status, queue depths, consumers,
workers alive and lost, the oldest queued job. Any replica answers the same numbers from the same
rows, so scrape it from **one** target (a ``sum`` over several would double count); a scrape is a
handful of grouped SQL queries. The job durations and webhook outcomes are no longer here: the
workers count them as they happen (``worker.metrics``, on each worker's own port), which is what
``rate()`` and ``histogram_quantile()`` need.

Label values are stable across restarts: a worker is its configured name (the part of the Celery node
name before ``@``; the queues it serves when it was left at the ``gpujobs-<pid>`` default) and its host,
never the heartbeat row's pid and random suffix.

Access: open unless ``GPUJOBS_METRICS_TOKEN`` is set; then a scrape must send
``Authorization: Bearer <token>`` (Prometheus ``authorization: {credentials: …}``). The
numbers reveal no job contents or keys, but they do name worker hosts and models: on a
deployment reachable from outside, set the token or keep ``/metrics`` off the proxy.
"""

from __future__ import annotations

import hmac
import re
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from api import config, instruments, stats
from api.errors import ApiError
from api.openapi import document
from db.models import JobStatus, utcnow
from db.settings import Settings

bp = Blueprint("metrics", __name__)


class JobSystemCollector(Collector):
    """Collects, at scrape time, what the database and the broker say about the whole system."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        self.settings = settings

    def collect(self) -> Iterator[Any]:
        from worker.jobs import job_types

        session, settings = self.session, self.settings
        now = utcnow()
        since = now - timedelta(seconds=settings.metrics_window_seconds)

        jobs = GaugeMetricFamily("gpujobs_jobs", "Jobs in the database by type and status.", labels=["type", "status"])
        counts = stats.jobs_by_type_and_status(session)
        for job_type in sorted(set(job_types(settings)) | {t for t, _ in counts}):
            for status in JobStatus:
                jobs.add_metric([job_type, status.value], counts.get((job_type, status.value), 0))
        yield jobs

        yield from self._queues()

        deliveries = GaugeMetricFamily("gpujobs_webhook_deliveries", "Webhook deliveries by status.", labels=["status"])
        for delivery_status, count in stats.webhook_deliveries_by_status(session).items():
            deliveries.add_metric([delivery_status], count)
        yield deliveries

        oldest = GaugeMetricFamily(
            "gpujobs_oldest_queued_job_age_seconds",
            "Age of the oldest queued job per queue (0 when none waits): a stuck queue shows here first.",
            labels=["queue"],
        )
        for queue, age in sorted(stats.oldest_queued_age(session).items()):
            oldest.add_metric([queue], age)
        yield oldest

        yield from self._workers(since)

    def _queues(self) -> Iterator[Any]:
        depths, error = stats.broker_queue_depths()
        broker = GaugeMetricFamily("gpujobs_broker_up", "1 when the broker answered this scrape's queue-depth query.")
        broker.add_metric([], 0 if error else 1)
        yield broker
        depth = GaugeMetricFamily(
            "gpujobs_queue_depth", "Messages waiting in each broker queue (what autoscalers need).", labels=["queue"]
        )
        for queue, count in sorted(depths.items()):
            depth.add_metric([queue], count)
        yield depth
        queued = GaugeMetricFamily(
            "gpujobs_jobs_queued", "Queued jobs per queue, as the database counts them.", labels=["queue"]
        )
        for queue, count in sorted(stats.queued_by_queue(self.session).items()):
            queued.add_metric([queue], count)
        yield queued
        health = stats.queue_health(self.session, self.settings.worker_lost_seconds)
        consumers = GaugeMetricFamily(
            "gpujobs_queue_consumers",
            "Alive worker processes serving each queue (heard from within worker_lost_seconds, not stopped).",
            labels=["queue"],
        )
        stalled = GaugeMetricFamily(
            "gpujobs_queue_stalled",
            "1 when the queue has work (gpu, train: queued jobs; webhooks: due deliveries; maintenance: queued "
            "or running jobs, which the reconciler guards) and no alive consumer, else 0.",
            labels=["queue"],
        )
        for queue, state in health.items():
            consumers.add_metric([queue], state.consumers)
            stalled.add_metric([queue], 1 if state.stalled else 0)
        yield consumers
        yield stalled

    def _workers(self, since: Any) -> Iterator[Any]:
        rows = stats.workers(self.session, self.settings.worker_lost_seconds, since)
        states = GaugeMetricFamily(
            "gpujobs_workers",
            "Worker processes: alive (heard from within worker_lost_seconds) and lost (silent longer, but "
            "heard from within the metrics window); stopped ones are not counted.",
            labels=["state"],
        )
        for state in ("alive", "lost"):
            states.add_metric([state], sum(1 for w in rows if w.state == state))
        yield states
        yield GaugeMetricFamily(
            "gpujobs_workers_warming",
            "Alive workers still loading and warming their models at start (GPUJOBS_WARM_SIZES): no jobs yet.",
            value=sum(1 for w in rows if w.state == "alive" and w.row.warming),
        )
        # Summed per stable label: two processes may share one (the same name on one host).
        used: dict[tuple[str, str], float] = defaultdict(float)
        total: dict[tuple[str, str], float] = defaultdict(float)
        running: dict[tuple[str, str], float] = defaultdict(float)
        for worker in rows:
            if worker.state != "alive":
                continue
            names = (worker_label(worker.row.id, worker.row.queues or []), worker.row.hostname)
            running[names] += len(worker.row.current_jobs or [])
            device = worker.device
            if device.get("memory_total_mb") is not None:
                used[names] += float(device.get("memory_used_mb", 0)) * 2**20
                total[names] += float(device["memory_total_mb"]) * 2**20
        for name, text, values in (
            ("gpujobs_worker_gpu_memory_used_bytes", "GPU memory in use (alive workers).", used),
            ("gpujobs_worker_gpu_memory_total_bytes", "GPU memory (alive workers).", total),
            ("gpujobs_worker_current_jobs", "Jobs each alive worker runs now.", running),
        ):
            family = GaugeMetricFamily(name, text, labels=["worker", "host"])
            for labels, number in sorted(values.items()):
                family.add_metric(list(labels), number)
            yield family


_PID_DEFAULT = re.compile(r"gpujobs-\d+")


def worker_label(row_id: str, queues: list[str]) -> str:
    """A worker's stable name: ``<name>`` of its ``<name>@<host>:<pid>:<random>`` row id, or its queues
    (``gpu,train``) when the name is the ``gpujobs-<pid>`` default that changes at every restart."""
    name = row_id.split(":", 1)[0].split("@", 1)[0]
    if _PID_DEFAULT.fullmatch(name):
        return ",".join(sorted(queues)) or name
    return name


def _authorize() -> None:
    token = config.settings().metrics_token
    if not token:
        return
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token.encode()):
        raise ApiError(
            401,
            "Send the metrics token as `Authorization: Bearer <GPUJOBS_METRICS_TOKEN>`.",
            headers={"WWW-Authenticate": 'Bearer realm="gpujobs-metrics"'},
        )


@bp.get("/metrics")
@document(
    "Prometheus metrics of this API server's processes: HTTP requests, jobs submitted, process_*, build info "
    "(Bearer GPUJOBS_METRICS_TOKEN when set)",
    public=True,
    responses={200: "text/plain"},
)
def metrics() -> Response:
    _authorize()
    return Response(generate_latest(instruments.registry()), headers={"Content-Type": CONTENT_TYPE_LATEST})


@bp.get("/metrics/cluster")
@document(
    "Prometheus gauges of the whole system, from the database and the broker: scrape one replica only "
    "(Bearer GPUJOBS_METRICS_TOKEN when set)",
    public=True,
    responses={200: "text/plain"},
)
def cluster_metrics() -> Response:
    _authorize()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobSystemCollector(g.db, config.settings()))
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
