"""Settings shared by every gpujobs process: typed, read once, from ``GPUJOBS_*`` variables.

Every field's default is documented here and in the README's configuration table.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUJOBS_", extra="ignore")

    # --- where things live -------------------------------------------------
    var_dir: Path = Field(Path("var"), description="Local state of `gpujobs up` (SQLite, embedded Redis and S3).")
    database_url: str = Field("sqlite:///var/gpujobs.db", description="SQLAlchemy URL; PostgreSQL in production.")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis or RabbitMQ).")
    redis_url: str | None = Field(
        None,
        description="Redis for rate limits and finish notifications; defaults to the broker when it is Redis.",
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

    # --- jobs and workers -----------------------------------------------------
    lease_seconds: float = Field(30.0, gt=0, description="How long a running job stays claimed without renewal.")
    control_poll_seconds: float = Field(
        0.5, gt=0, description="How often a running job renews its lease, saves progress and reads cancel."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Runs of a job before a lost worker fails it.")
    job_deadline_seconds: float = Field(3600.0, gt=0, description="Default time a job may run (per type override).")
    dispatch_grace_seconds: float = Field(
        5.0, ge=0, description="Age after which a queued job whose message was never sent is dispatched."
    )
    redispatch_seconds: float = Field(
        900.0, gt=0, description="Age after which a still-queued job's message is presumed lost and sent again."
    )
    reconcile_interval_seconds: float = Field(5.0, gt=0, description="Period of the reconciler on beat.")
    worker_concurrency: int = Field(2, ge=1, le=64, description="Jobs one worker process runs at once (threads).")
    upload_attempts: int = Field(4, ge=1, le=20, description="Tries to store one artifact before the job fails.")

    heartbeat_seconds: float = Field(5.0, gt=0, description="How often each worker process records its heartbeat.")
    worker_lost_seconds: float = Field(30.0, gt=0, description="A worker silent this long is shown as lost.")

    # --- models ---------------------------------------------------------------
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
        384, ge=64, le=2048, multiple_of=32,
        description="Images are resized to fit an N×N canvas and padded to it, so concurrent jobs batch exactly.",
    )
    segmentation_max_wait_ms: float = Field(
        10.0, ge=0, le=5000, description="How long a segmentation batch waits for more images before it runs."
    )

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
