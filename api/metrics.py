"""``GET /metrics``: Prometheus text, computed from the database (and the broker) at scrape time.

Why a custom collector over the database rather than ``prometheus_client``'s multiprocess
mode: the numbers that matter (jobs by status, queue wait and run times, webhook outcomes,
workers) are facts about the whole system, recorded in the database by every process
(API, workers, beat). Counting them in each API process would see only the requests that
process served, and multiprocess mode adds files in a shared directory that must be wiped
at every deploy and still cannot see what the workers did. A scrape of any API process, on
any machine, answers the same from the same rows; nothing is lost when a process restarts.

What a scrape costs: a handful of grouped SQL queries. ``gpujobs_jobs`` counts the whole
``jobs`` table by type and status; the histograms and webhook attempts are bounded to the
last ``metrics_window_seconds`` (default one hour), so they are window snapshots, not
ever-growing counters: read them with ``histogram_quantile(0.95, gpujobs_job_run_seconds_bucket)``
directly, without ``rate()``.

Access: open unless ``GPUJOBS_METRICS_TOKEN`` is set; then a scrape must send
``Authorization: Bearer <token>`` (Prometheus ``authorization: {credentials: …}``). The
numbers reveal no job contents or keys, but they do name worker hosts and models: on a
deployment reachable from outside, set the token or keep ``/metrics`` off the proxy.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from api import config, stats
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

        for kind, name, text in (
            ("queue_wait", "gpujobs_job_queue_wait_seconds", "Time from submission to (latest) start"),
            ("run", "gpujobs_job_run_seconds", "Time from (latest) start to finish"),
        ):
            verb = "started" if kind == "queue_wait" else "finished"
            family = HistogramMetricFamily(
                name, f"{text}, of jobs that {verb} in the last metrics window.", labels=["type"]
            )
            for job_type, histogram in sorted(stats.histograms(session, kind, since).items()):  # type: ignore[arg-type]
                pairs = zip(histogram.bounds, histogram.buckets, strict=True)
                buckets = [(_le(bound), count) for bound, count in pairs]
                buckets.append(("+Inf", histogram.count))
                family.add_metric([job_type], buckets, histogram.total)
            yield family

        attempts = GaugeMetricFamily(
            "gpujobs_webhook_attempts",
            "Webhook delivery attempts in the last metrics window, by outcome "
            "(delivered: a 2xx; http_error: another answer; error: no answer).",
            labels=["outcome"],
        )
        outcomes = stats.webhook_attempts_by_outcome(session, since)
        for outcome in ("delivered", "http_error", "error"):
            attempts.add_metric([outcome], outcomes.get(outcome, 0))
        yield attempts
        deliveries = GaugeMetricFamily("gpujobs_webhook_deliveries", "Webhook deliveries by status.", labels=["status"])
        for delivery_status, count in stats.webhook_deliveries_by_status(session).items():
            deliveries.add_metric([delivery_status], count)
        yield deliveries

        yield from self._workers(since)

        window = GaugeMetricFamily(
            "gpujobs_metrics_window_seconds", "The window of the histograms and webhook attempts."
        )
        window.add_metric([], settings.metrics_window_seconds)
        yield window

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
        labels = ["worker", "host"]
        used = GaugeMetricFamily(
            "gpujobs_worker_gpu_memory_used_bytes", "GPU memory in use (alive workers).", labels=labels
        )
        total = GaugeMetricFamily("gpujobs_worker_gpu_memory_total_bytes", "GPU memory (alive workers).", labels=labels)
        running = GaugeMetricFamily("gpujobs_worker_current_jobs", "Jobs each alive worker runs now.", labels=labels)
        for worker in rows:
            if worker.state != "alive":
                continue
            names = [worker.row.id, worker.row.hostname]
            running.add_metric(names, len(worker.row.current_jobs or []))
            device = worker.device
            if device.get("memory_total_mb") is not None:
                used.add_metric(names, float(device.get("memory_used_mb", 0)) * 2**20)
                total.add_metric(names, float(device["memory_total_mb"]) * 2**20)
        yield from (used, total, running)


def _le(bound: float) -> str:
    return repr(float(bound))


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
    "Prometheus metrics, computed from the database at scrape time (Bearer GPUJOBS_METRICS_TOKEN when set)",
    public=True,
    responses={200: "text/plain"},
)
def metrics() -> Response:
    _authorize()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobSystemCollector(g.db, config.settings()))
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
