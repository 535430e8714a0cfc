"""Process metrics with Prometheus semantics: counters and histograms recorded where the event happens.

Why here and not over the database: a counter that only goes up, kept by the process that saw the
event, is what ``rate()``, ``increase()`` and ``histogram_quantile()`` are made for; the old window
snapshots computed from the database went down as well as up, and every API replica reported the
same numbers. The database-derived gauges (queue depth, workers alive) stay, served once, by
``GET /metrics/cluster`` (``api.metrics``).

Who records what:

- the API: jobs submitted (``api.jobs``), HTTP requests and their latency (``api.instruments``);
- the worker: jobs finished with their status and error code, queue wait (at claim) and run time (at
  the end) in ``worker.runner``; webhook attempts by outcome (``worker.webhooks.delivery``); model
  loads, cache hits, evictions and batch sizes (``worker.models.cache`` and the job packages).

Where they are read: the API's processes (gunicorn forks several) write to files under
``PROMETHEUS_MULTIPROC_DIR``, which ``gpujobs api`` sets and wipes at start, and ``GET /metrics`` sums
them (``api.instruments``). A worker is one process (Celery's thread pool) and serves its own registry on
``GPUJOBS_WORKER_METRICS_PORT`` (``serve``). Label values are bounded: job types, queues, statuses, error
codes, model names, URL rules (never a raw path), no pid or random suffix.

Recording is a dictionary look-up and a lock per event: cheap next to a job's database round trips.
"""

from __future__ import annotations

import logging
import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

# Seconds; the same bounds the old window histograms had, so the dashboard's quantiles read alike.
QUEUE_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
RUN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)

JOBS_SUBMITTED = Counter("gpujobs_jobs_submitted", "Jobs created by the API.", ["type", "queue"])
JOBS_FINISHED = Counter(
    "gpujobs_jobs_finished",
    "Job attempts that ended on this worker: succeeded, failed (error_code names why) or canceled.",
    ["type", "queue", "status", "error_code"],
)
QUEUE_WAIT = Histogram(
    "gpujobs_job_queue_wait_seconds",
    "Submission to start of each attempt a worker claimed (the database's clock).",
    ["type"],
    buckets=QUEUE_WAIT_BUCKETS,
)
RUN_TIME = Histogram(
    "gpujobs_job_run_seconds",
    "Start to end of each attempt that ended on this worker (succeeded, failed or canceled).",
    ["type"],
    buckets=RUN_BUCKETS,
)
WEBHOOK_ATTEMPTS = Counter(
    "gpujobs_webhook_attempts",
    "Webhook delivery attempts by outcome: delivered (a 2xx), http_error (another answer), error (no answer).",
    ["outcome"],
)
MODEL_LOADS = Counter("gpujobs_model_loads", "Models loaded into this worker's cache (misses).", ["model"])
MODEL_LOAD_SECONDS = Counter("gpujobs_model_load_seconds", "Time spent loading models.", ["model"])
MODEL_CACHE_HITS = Counter("gpujobs_model_cache_hits", "Model cache look-ups answered by a loaded model.", ["model"])
MODEL_CACHE_EVICTIONS = Counter(
    "gpujobs_model_cache_evictions", "Models dropped from the cache to stay within its memory budget.", ["model"]
)
BATCH_SIZE = Histogram(
    "gpujobs_model_batch_size",
    "Inputs per model forward pass (segmentation: images batched together; diffusion: images per run).",
    ["model"],
    buckets=BATCH_BUCKETS,
)
SEGMENTATION_PADDING = Histogram(
    "gpujobs_segmentation_padding_ratio",
    "Share of a segmentation batch's input pixels that is padding (its images' pixels within their bucket "
    "against the bucket's), by bucket: the padded shape, `WIDTHxHEIGHT` (a few, from the settings).",
    ["model", "bucket"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75),
)
HTTP_REQUESTS = Counter(
    "gpujobs_http_requests", "HTTP requests answered, by URL rule (never the raw path).", ["route", "method", "status"]
)
HTTP_LATENCY = Histogram(
    "gpujobs_http_request_duration_seconds",
    "Time from a request's arrival in the app to its answer (streamed bodies: to the first byte).",
    ["route", "method"],
    buckets=HTTP_BUCKETS,
)
BUILD_INFO = Gauge(
    "gpujobs_build_info",
    "Always 1: the version and git revision this process runs.",
    ["version", "revision"],
    multiprocess_mode="max",
)


def job_finished(job_type: str, queue: str, status: str, error_code: str, run_seconds: float) -> None:
    JOBS_FINISHED.labels(job_type, queue, status, error_code).inc()
    RUN_TIME.labels(job_type).observe(max(run_seconds, 0.0))


def webhook_attempt(status_code: int | None) -> None:
    outcome = "error" if status_code is None else "delivered" if 200 <= status_code < 300 else "http_error"
    WEBHOOK_ATTEMPTS.labels(outcome).inc()


def model_name(key: str) -> str:
    """A cache key (``kind:model@variant``) without its variant: bounded by the catalog."""
    return key.split("@", 1)[0]


@cache
def build() -> tuple[str, str]:
    """(version, revision): ``GPUJOBS_REVISION`` (images set it at build) or the checkout's git HEAD."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("gpujobs")
    except PackageNotFoundError:  # a checkout run without installing it
        release = "0+unknown"
    revision = os.environ.get("GPUJOBS_REVISION", "")
    if not revision:
        try:
            revision = subprocess.run(
                ["git", "rev-parse", "--short=12", "HEAD"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            revision = ""
    return release, revision or "unknown"


def record_build_info() -> None:
    BUILD_INFO.labels(*build()).set(1)


# The failures the runner itself names, for any job type (a job's own codes start at their first failure).
RUNNER_ERROR_CODES = ("internal_error", "storage_error", "deadline_exceeded", "invalid_input")


def initialise(queues: list[str]) -> None:
    """Give the job series of the job types this worker serves a first sample of 0, so that the first job
    counts in ``rate()`` and ``increase()`` (a series born at 1 hides its first increment)."""
    from worker.jobs import job_types

    for job_type in job_types().values():
        queue = job_type.queue.value
        if queue in queues:
            JOBS_FINISHED.labels(job_type.name, queue, "succeeded", "")
            JOBS_FINISHED.labels(job_type.name, queue, "canceled", "")
            for code in RUNNER_ERROR_CODES:
                JOBS_FINISHED.labels(job_type.name, queue, "failed", code)
            QUEUE_WAIT.labels(job_type.name)
            RUN_TIME.labels(job_type.name)


def serve(port: int, host: str, queues: list[str]) -> Any:
    """Serve this process's registry (with ``process_*`` and, on a GPU, NVML gauges) on ``host:port``."""
    from prometheus_client import REGISTRY, disable_created_metrics, start_http_server

    from worker import nvml

    # ``*_created`` series would double the count for no query we run.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    record_build_info()
    initialise(queues)
    WEBHOOK_ATTEMPTS.labels("delivered")
    nvml.register(REGISTRY)
    server, _thread = start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
