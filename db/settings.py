"""Settings shared by every gpujobs process: typed, read once, from ``GPUJOBS_*`` variables.

Every field's default is documented here and in the README's configuration table.
"""

from __future__ import annotations

import ipaddress
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Bucket(NamedTuple):
    """A padded input shape of the segmentation model (``segmentation_buckets``)."""

    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


# The default buckets' aspect ratios (short side / long side): 4:3 (phones, compact cameras; 3:2 DSLR photos
# fit it with 11% padding) and 16:9 (video frames, screenshots; 2:1 panoramas fit it with 11%). With the
# square they cover the common shapes in five buckets (five graphs per batch size when compiled); an image
# between two ratios goes to the next squarer bucket, as wasteful at worst as the gap between them.
DEFAULT_BUCKET_RATIOS = (3 / 4, 9 / 16)


def default_segmentation_buckets(canvas: int) -> list[Bucket]:
    """N×N, and for each of ``DEFAULT_BUCKET_RATIOS`` a landscape N×(rN rounded up to 32) and its portrait
    transpose: for N=384, 384x384, 384x288, 288x384, 384x224, 224x384."""
    buckets = [Bucket(canvas, canvas)]
    for ratio in DEFAULT_BUCKET_RATIOS:
        short = min(canvas, math.ceil(canvas * ratio / 32) * 32)
        buckets += [Bucket(canvas, short), Bucket(short, canvas)]
    return list(dict.fromkeys(buckets))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUJOBS_", extra="ignore")

    # --- where things live -------------------------------------------------
    var_dir: Path = Field(Path("var"), description="Local state of `gpujobs up` (SQLite, embedded Redis and S3).")
    database_url: str = Field("sqlite:///var/gpujobs.db", description="SQLAlchemy URL; PostgreSQL in production.")

    # --- PostgreSQL bounds and readiness (README "Operate") ------------------------
    database_connect_timeout_seconds: int = Field(
        3,
        ge=2,
        le=300,
        description="Longest wait for a new PostgreSQL connection (libpq `connect_timeout`, at least 2); also "
        "bounds the ping of a pooled connection before use.",
    )
    database_statement_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=86400,
        description="PostgreSQL `statement_timeout` of every connection (migrations excepted). The client also "
        "gives up on a server that sends no answer for this plus 2 s (a frozen server), closing the connection.",
    )
    database_pool_timeout_seconds: float = Field(
        5.0, gt=0, le=300, description="Longest wait for a free pooled database connection when all are in use."
    )
    broker_timeout_seconds: float = Field(
        3.0,
        gt=0,
        le=300,
        description="Longest wait for a broker connection and for the broker's answer to one command (Redis "
        "socket timeout); a submit whose send fails or times out is still accepted (the reconciler sends it).",
    )
    readiness_timeout_seconds: float = Field(
        1.5,
        gt=0,
        le=30,
        description="`GET /readyz` checks its dependencies concurrently; one that has not answered within this "
        "is reported down.",
    )
    readiness_cache_seconds: float = Field(
        1.0,
        ge=0,
        le=60,
        description="How long `GET /readyz` reuses its last checks, so that a flood of probes does not multiply "
        "calls to the dependencies.",
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis or RabbitMQ).")
    redis_url: str | None = Field(
        None,
        description="Redis for rate limits and finish notifications; defaults to the broker when it is Redis.",
    )
    redis_connect_timeout_seconds: float = Field(
        1.0, gt=0, le=60, description="Longest wait to open a connection to Redis (rate limits, notifications)."
    )
    redis_socket_timeout_seconds: float = Field(
        2.0,
        gt=0,
        le=60,
        description="Longest wait for one Redis command's answer; a hung Redis costs at most this, then the "
        "breaker skips it.",
    )
    redis_breaker_seconds: float = Field(
        5.0,
        gt=0,
        le=600,
        description="After a Redis error, how long a process skips Redis (rate limits and failed-login counters "
        "let requests through, waits read the database) before one request tries it again.",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; unset means AWS S3.")
    s3_public_url: str | None = Field(
        None, description="Endpoint used in presigned URLs handed to clients, if it differs from s3_endpoint_url."
    )
    s3_bucket: str = Field("gpujobs", description="Bucket for inputs, job outputs and models (created if missing).")
    s3_access_key: str | None = Field(None, description="S3 access key id.")
    s3_secret_key: str | None = Field(None, description="S3 secret access key.")
    s3_region: str = Field("us-east-1", description="S3 region.")
    presign_expiry_seconds: int = Field(3600, ge=60, le=7 * 24 * 3600, description="Lifetime of download URLs.")
    s3_connect_timeout_seconds: float = Field(
        2.0, gt=0, le=60, description="Longest wait to connect to S3 (each try of each call)."
    )
    s3_read_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Longest wait for S3 to send or accept bytes within one try of a call (a hung S3 is given up "
        "on after this).",
    )
    s3_max_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="Tries of one S3 call (botocore's standard retry mode with backoff; the only retry layer, so "
        "a call takes at most about this many times the timeouts). Readiness probes try once.",
    )
    storage_retry_window_seconds: float = Field(
        600.0,
        ge=0,
        le=86400,
        description="How long a running job keeps trying to store an output (kept meanwhile under "
        "`<var_dir>/spool/`, the lease renewed) when S3 fails, before it ends `failed` with `storage_error`.",
    )

    # --- API ----------------------------------------------------------------
    admin_key: str | None = Field(None, description="Bootstrap admin key, created at start if missing.")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest request body; larger is a 413.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest decoded image (width × height).")
    image_formats: list[str] = Field(
        ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"], description="Image formats accepted on upload."
    )
    max_json_field_bytes: int = Field(16 * 1024, ge=256, description="Largest `metadata` object on a job.")
    rate_limit_per_minute: int = Field(
        6000, ge=0, description="Requests per minute per API key (0 disables the limit)."
    )
    max_wait_seconds: int = Field(60, ge=0, le=600, description="Upper bound of `Prefer: wait=N`.")
    wait_recheck_seconds: float = Field(
        2.0,
        gt=0,
        le=60,
        description="How often each API process re-reads, in one query, which waited-for jobs finished: the "
        "fallback of the Redis wake-up (a missed message; with Redis down, the delay of a `Prefer: wait` answer).",
    )
    max_waits_per_key: int = Field(
        100, ge=1, description="Concurrent `Prefer: wait` requests one API key may hold per API process; more: 429."
    )
    max_waits_per_tenant: int = Field(
        200, ge=1, description="Concurrent `Prefer: wait` requests one tenant may hold per API process; more: 429."
    )
    max_streams_per_key: int = Field(
        100,
        ge=1,
        description="Concurrent job event streams (`/v1/jobs/{id}/events`) one API key may hold per API "
        "process; more: 429.",
    )
    max_streams_per_tenant: int = Field(
        300, ge=1, description="Concurrent job event streams one tenant may hold per API process; more: 429."
    )
    sse_keepalive_seconds: float = Field(
        15.0, gt=0, le=300, description="How often an idle job event stream sends a `: keep-alive` comment."
    )
    sse_recheck_seconds: float = Field(
        5.0,
        gt=0,
        le=300,
        description="How often an event stream re-reads its job while the API process has no Redis subscription "
        "(the fallback of the Redis wake-up); with Redis up it re-reads at each keep-alive as well.",
    )
    sse_max_seconds: float = Field(
        3600.0,
        gt=0,
        description="How long one event stream stays open; then it ends and the client resumes with `Last-Event-ID`.",
    )
    auth_failure_limit: int = Field(
        20,
        ge=0,
        description="Failed authentications (unknown or revoked key, on `/v1` or the admin login) from one client "
        "address per window; past it, every request from that address presenting a key is a 429 until the window "
        "ends (0 disables).",
    )
    auth_failure_prefix_limit: int = Field(
        10,
        ge=0,
        description="Failed authentications with one key prefix (its first 12 characters) per window, from any "
        "address; past it, keys with that prefix that fail are a 429 until the window ends; a valid one still works "
        "(0 disables).",
    )
    auth_failure_window_seconds: int = Field(
        60, ge=1, le=86400, description="Window of the failed-authentication limits (fixed, aligned on the clock)."
    )
    trusted_proxy_hops: int = Field(
        0,
        ge=0,
        le=10,
        description="Reverse proxies in front of the API that append the client to `X-Forwarded-For`: the address "
        "that failed-authentication limits count is taken this many entries from its right (0: the TCP peer).",
    )

    # --- admin dashboard and metrics -------------------------------------------
    session_secret: str | None = Field(
        None,
        description="Signs the admin dashboard's session cookies. Unset: a random secret made once and kept in "
        "`<var_dir>/session-secret`, which the API processes of one machine share; set it (the same everywhere) "
        "when several machines serve the API.",
    )
    metrics_token: str | None = Field(
        None,
        description="When set, `GET /metrics` and `GET /metrics/cluster` need `Authorization: Bearer <token>`; "
        "unset, they are open "
        "(keep it off the public internet).",
    )
    metrics_window_seconds: float = Field(
        3600.0,
        ge=60,
        le=7 * 86400,
        description="`/metrics/cluster` counts as lost the workers silent past `worker_lost_seconds` but heard "
        "from within this window (older ones are gone, not lost).",
    )
    worker_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Each worker process serves its own Prometheus `/metrics` (jobs finished, queue wait and run "
        "time, webhooks, model cache, GPU) on this port; 0 is off. One port per worker process on a host.",
    )
    worker_metrics_host: str = Field(
        "0.0.0.0",
        description="The address a worker's `/metrics` listens on (with `worker_metrics_port`).",
    )

    # --- jobs and workers -----------------------------------------------------
    lease_seconds: float = Field(30.0, gt=0, description="How long a running job stays claimed without renewal.")
    control_poll_seconds: float = Field(
        0.5, gt=0, description="How often a running job renews its lease, saves progress and reads cancel."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Runs of a job before a lost worker fails it.")
    job_deadline_seconds: float = Field(3600.0, gt=0, description="Default time a job may run (per type override).")
    dispatch_buffer: int = Field(
        1,
        ge=0,
        le=1000,
        description="Messages the scheduler keeps in each queue beyond its live workers' free slots, so a slot that "
        "frees finds its next job waiting in the broker; the rest of the backlog waits in the database.",
    )
    dispatch_slots_cache_seconds: float = Field(
        1.0,
        ge=0,
        le=60,
        description="How long each process reuses the live workers' slots it read for the scheduler's passes "
        "(one statement less per submit and job end); 0 reads them on every pass.",
    )
    fair_share_window_seconds: float = Field(
        600.0,
        gt=0,
        le=7 * 86400,
        description="The scheduler shares each queue between tenants by the GPU-seconds they used in this recent "
        "window (weighted), giving the next slot to the tenant that used least.",
    )
    redispatch_seconds: float = Field(
        900.0, gt=0, description="Age after which a still-queued job's message is presumed lost and sent again."
    )
    lost_message_seconds: float = Field(
        30.0,
        gt=0,
        description="A queued job sent this long ago whose queue is empty in the broker lost its message: sent again.",
    )
    reconcile_interval_seconds: float = Field(5.0, gt=0, description="Period of the reconciler on beat.")
    worker_concurrency: int = Field(2, ge=1, le=64, description="Jobs one worker process runs at once (threads).")
    worker_task_events: bool = Field(
        False,
        description="Workers send Celery task events from their start. Off, they send none (three broker writes "
        "less per job) until a monitor asks: Flower does every few seconds, by remote control.",
    )

    log_format: Literal["text", "json"] = Field(
        "text",
        description="How every process logs to stderr: `text` for people, `json` for one JSON object a line "
        "(timestamp, level, logger, role, request and job ids) for log shippers.",
    )
    trace_file: Path | None = Field(
        None,
        description="Also write every finished trace span, one JSON object a line, to this file (tests and "
        "debugging; needs the `otel` extra). Tracing is off unless this or OTEL_EXPORTER_OTLP_ENDPOINT is set.",
    )

    heartbeat_seconds: float = Field(5.0, gt=0, description="How often each worker process records its heartbeat.")
    worker_lost_seconds: float = Field(30.0, gt=0, description="A worker silent this long is shown as lost.")
    worker_drain_seconds: float = Field(
        20.0,
        ge=0,
        le=86400,
        description="On SIGTERM a worker takes no new job and lets its running jobs finish for up to this long, "
        "then hands each one still running back to the queue at its next step (a fine-tune checkpoints first); "
        "0 hands them back at once. Keep it below the orchestrator's grace period (Kubernetes: 30 s by default).",
    )

    # --- scheduling, quotas and retention (defaults; admins override per tenant) ----
    tenant_weight: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="Fair-share weight of a tenant without its own (twice the weight, twice the GPU time).",
    )
    quota_max_queued_jobs: int = Field(
        10_000, ge=0, description="Most queued jobs one tenant may hold; past it a submit is a 429 (0: no limit)."
    )
    quota_max_running_jobs: int = Field(
        0, ge=0, description="Most jobs of one tenant running at once on each queue (0: no limit)."
    )
    quota_submits_per_minute: int = Field(
        0, ge=0, description="Job submits per minute per tenant, all its keys together (0: no limit)."
    )
    quota_max_retained_bytes: int = Field(
        0,
        ge=0,
        description="Most bytes of job outputs one tenant keeps stored; past it a submit is a 429 (0: no limit).",
    )
    artifact_ttl: int = Field(
        0,
        ge=0,
        description="Seconds a finished job's outputs are kept (`GPUJOBS_ARTIFACT_TTL`); then they are deleted from "
        "storage and the job says `expired` (0: kept forever).",
    )
    job_retention: int = Field(
        0,
        ge=0,
        description="Seconds a finished job is kept (`GPUJOBS_JOB_RETENTION`, counted from its end); then its row, "
        "events, artifacts, webhook deliveries and stored outputs are deleted (0: kept forever). A job a model "
        "was made by is kept while the model exists.",
    )
    file_ttl: int = Field(
        0,
        ge=0,
        description="Seconds an uploaded input file is kept after the last job that named it was submitted (or "
        "after its upload, if none did) (`GPUJOBS_FILE_TTL`); then it is deleted from storage and its id "
        "answers 404 (0: kept forever). A file a queued or running job needs is never deleted.",
    )
    retention_interval_seconds: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="Period of the beat task that expires outputs, deletes unused input files and purges old jobs.",
    )
    retention_batch_size: int = Field(
        500,
        ge=1,
        le=1000,
        description="Artifacts expired, files deleted or jobs purged per transaction of the retention task "
        "(a short one each).",
    )
    retention_max_batches: int = Field(
        20, ge=1, le=10_000, description="Most batches of each kind one run of the retention task does."
    )

    # --- image inputs by URL or data URI (docs/api.md "Image inputs") ------------
    input_url_allow_http: bool = Field(
        False, description="Let image inputs be fetched from `http://` URLs; off, only `https://` URLs are fetched."
    )
    input_url_allow_private: bool = Field(
        False,
        description="Let image input URLs reach loopback, private, link-local and other non-public addresses "
        "(tests, single-machine setups). Separate from `GPUJOBS_WEBHOOK_ALLOW_PRIVATE`; off by default.",
    )
    input_url_allowed_networks: list[str] = Field(
        [],
        description="Networks (CIDR) that image input URLs may reach although they are not public, e.g. "
        '`["10.1.2.0/24"]` for an internal image store; every other non-public address stays refused.',
    )
    input_url_timeout_seconds: float = Field(
        15.0,
        gt=0,
        le=300,
        description="Time the input URLs of one submit may take together: connecting, TLS, redirects and every "
        "byte of the bodies. A server that is slower is cut off at this (a 422).",
    )
    input_url_max_redirects: int = Field(
        3, ge=0, le=10, description="Redirects an input URL may take; each target is checked again by the guard."
    )
    input_max_bytes: int = Field(
        0,
        ge=0,
        description="Largest image fetched from an input URL or decoded from a data URI; 0 means the upload "
        "limit (`GPUJOBS_MAX_BODY_BYTES`).",
    )

    @field_validator("input_url_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network (write it as 10.1.2.0/24 or 10.1.2.3)") from None
        return value

    @property
    def input_max_bytes_in_effect(self) -> int:
        """The input size limit: ``input_max_bytes``, or the upload limit when that is 0."""
        return self.input_max_bytes or self.max_body_bytes

    # --- webhooks -------------------------------------------------------------
    webhook_allow_private: bool = Field(
        False,
        description="Let webhooks reach loopback, private, link-local and other non-public addresses "
        "(tests, single-machine setups). Off, such URLs are refused at submit or at send.",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, le=120, description="Time one delivery attempt may take (connect, send, first answer)."
    )
    webhook_retry_base_seconds: float = Field(
        5.0, gt=0, description="Delay before the first retry; each next retry waits twice as long (with jitter)."
    )
    webhook_retry_max_delay_seconds: float = Field(
        7200.0, gt=0, description="Longest wait between two attempts (also caps a receiver's `Retry-After`)."
    )
    webhook_retry_horizon_seconds: float = Field(
        86400.0,
        gt=0,
        description="How long a delivery is retried after its event (or its redelivery); the last attempt is "
        "made at this horizon, then the delivery gives up.",
    )
    webhook_secret_grace_seconds: float = Field(
        86400.0, ge=0, description="After a secret rotation, how long the previous secret still signs too."
    )
    webhook_progress_seconds: float = Field(
        2.0, gt=0, description="Least time between two `progress` webhooks of one job."
    )
    webhook_sweep_seconds: float = Field(
        5.0, gt=0, description="Period of the beat task that sends due webhook deliveries and retries."
    )
    webhook_sender_threads: int = Field(
        16,
        ge=1,
        le=256,
        description="Threads of each `webhooks` worker process that make delivery attempts (beside Celery's own: "
        "a slow receiver holds one of these, never a worker slot).",
    )
    webhook_endpoint_concurrency: int = Field(
        4,
        ge=1,
        le=64,
        description="Most attempts in flight at once to one endpoint (a tenant's scheme://host:port), across all "
        "webhooks workers; its other due deliveries wait for a free slot.",
    )
    webhook_breaker_failures: int = Field(
        5,
        ge=1,
        le=1000,
        description="Consecutive failures (no answer, 5xx or 429) after which an endpoint's circuit breaker opens: "
        "its deliveries are deferred, not attempted.",
    )
    webhook_breaker_open_seconds: float = Field(
        30.0,
        gt=0,
        description="How long a circuit breaker stays open the first time; then one probe attempt is made "
        "(half-open). Each failed probe doubles the wait.",
    )
    webhook_breaker_max_open_seconds: float = Field(
        900.0, gt=0, description="Longest time a circuit breaker stays open before its next probe."
    )

    # --- models ---------------------------------------------------------------
    job_registry: str = Field(
        "worker.jobs.registry:JOB_TYPES",
        description="The job types served, as `module:attribute` naming a list of `JobType`s; API and workers "
        "must name the same one (add your own types by listing the built-in ones and yours).",
    )
    model_catalog: Path | None = Field(
        None, description="TOML model catalog; unset means the built-in one naming the real public checkpoints."
    )
    model_dir: Path | None = Field(None, description="Where models from S3 are cached; default `<var_dir>/models`.")
    device: str = Field("auto", description="`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.")
    dtype: str = Field("auto", description="`auto` (fp16 on CUDA, fp32 on CPU), `float32`, `float16`, `bfloat16`.")
    model_memory_mb: int = Field(
        0, ge=0, description="Memory budget of the model cache; 0 = 90% of GPU memory on CUDA, 8192 MB on CPU."
    )
    preload_models: list[str] = Field([], description="Catalog names a worker loads at start (JSON list).")
    segmentation_max_batch_size: int = Field(8, ge=1, le=64, description="Most images in one segmentation batch.")
    segmentation_image_size: int = Field(
        384,
        ge=64,
        le=2048,
        multiple_of=32,
        description="The canvas N: each image is resized to fit N×N (aspect kept), then padded to the smallest "
        "of `segmentation_buckets` that holds it.",
    )
    segmentation_buckets: list[str] = Field(
        [],
        description="Padded shapes (`WIDTHxHEIGHT`, JSON list; sides multiples of 32, at most the canvas) that "
        "segmentation images are padded to: an image goes to the smallest that holds it, always the same one, "
        "and only images of one bucket share a batch. The N×N canvas is always one. Empty: N×N, N×3N/4 and "
        "N×9N/16 (4:3 and 16:9, rounded up to 32) and their portrait transposes.",
    )
    segmentation_max_wait_ms: float = Field(
        10.0, ge=0, le=5000, description="How long a segmentation batch waits for more images before it runs."
    )
    generation_max_width: int = Field(
        2048, ge=64, le=16384, multiple_of=8, description="Widest image a generation job may make (pixels)."
    )
    generation_max_height: int = Field(
        2048, ge=64, le=16384, multiple_of=8, description="Tallest image a generation job may make (pixels)."
    )
    generation_max_pixels: int = Field(
        1024 * 1024,
        ge=64 * 64,
        description="Largest width × height a generation job may make (inpainting and style-transfer inputs "
        "included, after rounding to a multiple of 8); bounds the GPU memory of one run.",
    )
    generation_max_steps: int = Field(
        150, ge=1, le=150, description="Most denoising steps (`num_inference_steps`) a generation job may ask for."
    )
    generation_max_prompt_chars: int = Field(
        2000, ge=1, le=100_000, description="Longest `prompt` / `negative_prompt` (characters) a generation job takes."
    )
    lora_cache_size: int = Field(
        8,
        ge=0,
        le=256,
        description="LoRA adapters a worker keeps loaded in each warm UNet (least recently used dropped first); "
        "a job's LoRAs are switched on for its run only. 0: load and unload them for every job.",
    )
    finetune_max_images: int = Field(
        1000, ge=1, le=100_000, description="Most training images of one `finetune` job (file ids or zip members)."
    )
    finetune_max_resolution: int = Field(
        1024, ge=64, le=4096, multiple_of=8, description="Largest `resolution` a `finetune` job may train at."
    )
    finetune_max_dataset_bytes: int = Field(
        2 * 1024**3, ge=1024, description="Largest total uncompressed size of a dataset zip's members."
    )
    torch_compile: bool = Field(
        False,
        description="Compile the diffusion UNet and the segmentation model's forward with `torch.compile` (CUDA): "
        "faster after a slow first run per image size (segmentation: per bucket and padded batch size, built by "
        "the warm-up); measure with `bench/diffusion.py` before enabling.",
    )
    torch_compile_backend: str = Field(
        "inductor",
        description="The `torch.compile` backend of `torch_compile`: `inductor` (CUDA; segmentation captures CUDA "
        "graphs, mode `reduce-overhead`), or `eager` / `aot_eager` (no code generation: tests on a CPU).",
    )
    channels_last: bool = Field(
        False, description="Keep the diffusion UNet and VAE in channels-last memory format (often faster on CUDA)."
    )
    generation_max_batch_images: int = Field(
        8,
        ge=1,
        le=64,
        description="Most images in one text-to-image pipeline call shared by jobs that wait for the same model "
        "with the same LoRAs, size, steps, sampler and guidance (1: each job alone).",
    )
    generation_batch_wait_ms: float = Field(
        0.0,
        ge=0,
        le=5000,
        description="How long a text-to-image call waits for more jobs to share it before it starts (0: it "
        "takes only those already waiting for the model).",
    )
    warm_sizes: list[str] = Field(
        [],
        description="Image sizes (`WIDTHxHEIGHT`, JSON list) at which a worker runs each preloaded diffusion "
        "model once before it takes jobs; each preloaded segmentation model then runs each of its "
        "`segmentation_buckets` at batch 1 and the full batch (the sizes aside): with "
        "`torch_compile`, the graphs for these sizes are built (or read from the compile cache) at start, "
        "not by the first job of each size. The heartbeat says `warming` meanwhile; no job is sent to it.",
    )
    warm_steps: int = Field(2, ge=1, le=50, description="Denoising steps of each diffusion warm-up run.")
    compile_cache_dir: Path | None = Field(
        None,
        description="torch.compile's on-disk caches (Inductor's kernels and FX graphs), reused across restarts; "
        "unset: an operator's `TORCHINDUCTOR_CACHE_DIR`, else `<model_dir>/torch-compile` (the model-cache volume).",
    )

    @field_validator("segmentation_buckets")
    @classmethod
    def _buckets(cls, value: list[str], info: ValidationInfo) -> list[str]:
        canvas = info.data.get("segmentation_image_size")  # absent when it was invalid (reported on its own)
        for size in value:
            match = re.fullmatch(r"(\d+)x(\d+)", size)
            sides = [int(side) for side in match.groups()] if match else []
            if not sides or not all(side % 32 == 0 and 32 <= side <= (canvas or 2048) for side in sides):
                raise ValueError(
                    f"{size!r} is not WIDTHxHEIGHT with sides multiples of 32, from 32 to the canvas "
                    f"(GPUJOBS_SEGMENTATION_IMAGE_SIZE={canvas})"
                )
        return value

    @property
    def segmentation_buckets_in_effect(self) -> list[Bucket]:
        """``segmentation_buckets`` (or the default for the canvas) with the canvas itself, smallest area first."""
        canvas = self.segmentation_image_size
        if self.segmentation_buckets:
            listed = [Bucket(*(int(side) for side in size.split("x"))) for size in self.segmentation_buckets]
        else:
            listed = default_segmentation_buckets(canvas)
        return sorted({*listed, Bucket(canvas, canvas)}, key=lambda b: (b.area, b.height, b.width))

    @field_validator("warm_sizes")
    @classmethod
    def _sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            match = re.fullmatch(r"(\d+)x(\d+)", size)
            if not match or not all(64 <= int(side) <= 4096 and int(side) % 8 == 0 for side in match.groups()):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT with sides from 64 to 4096, multiples of 8")
        return value

    @property
    def effective_redis_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return self.broker_url
        return None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and the embedded launcher change the environment)."""
    get_settings.cache_clear()
