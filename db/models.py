"""The database schema as SQLAlchemy 2.0 typed models.

The schema itself is created only by Alembic (``migrations/``); a test checks that
``upgrade head`` gives exactly these models.
"""

from __future__ import annotations

import enum
import secrets
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """An opaque id: a prefix and 16 random url-safe bytes (e.g. ``job_…``)."""
    return f"{prefix}_{secrets.token_urlsafe(16)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


class Role(str, enum.Enum):
    USER = "user"
    ADMIN = "admin"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten"))
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TenantQuota(Base):
    """An admin's overrides of one tenant's scheduling weight, quotas and retention (NULL: the setting's default).

    A tenant without a row uses every default (``GPUJOBS_QUOTA_*``, ``GPUJOBS_ARTIFACT_TTL``).
    """

    __tablename__ = "tenant_quotas"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    # Fair-share weight: a tenant of weight 2 gets twice the GPU time of a tenant of weight 1 when both wait.
    weight: Mapped[float | None]
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    # Jobs running at once, per queue (``gpu`` and ``train`` counted apart).
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    submits_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_retained_bytes: Mapped[int | None] = mapped_column(BigInteger)
    artifact_ttl_seconds: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(String(16))
    # sha256 of the key: keys are 32 random bytes, so a fast hash is enough to make a leaked table useless.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    tenant: Mapped[Tenant] = relationship()


class File(Base):
    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_tenant_created", "tenant_id", "created_at", "id"),
        # Retention deletes the files no job used for ``file_ttl``, least recently used first.
        Index("ix_files_used_at", "used_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    purpose: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When a job last named it (set by the submit that does, in the job's transaction; the upload's time
    # before): the clock of ``GPUJOBS_FILE_TTL``.
    used_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        # A tenant's jobs of one type, newest first (GET /v1/jobs?type=): an exact range on a long history.
        Index("ix_jobs_tenant_type_created", "tenant_id", "type", "created_at", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_status_dispatched", "status", "dispatched_at"),
        # Every tenant's jobs newest first (admin lists), the windows of the dashboard and /metrics (and the
        # partial ix_jobs_finished_at below).
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_status_created", "status", "created_at", "id"),
        Index("ix_jobs_started_at", "started_at"),
        # A tenant's queued and running jobs (per queue), counted at every submit (quotas) without reading rows.
        Index("ix_jobs_tenant_status_queue", "tenant_id", "status", "queue"),
        # Retention purges finished jobs oldest end first (partial: a submit or a claim writes no entry).
        Index(
            "ix_jobs_finished_at",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
            sqlite_where=text("finished_at IS NOT NULL"),
        ),
        # The scheduler's pick: each tenant's waiting (queued, never sent) jobs of a queue, in its order.
        Index(
            "ix_jobs_waiting",
            "queue",
            "tenant_id",
            "priority",
            "created_at",
            postgresql_where=text("status = 'queued' AND dispatched_at IS NULL"),
            sqlite_where=text("status = 'queued' AND dispatched_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    type: Mapped[str] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)  # a JobStatus value
    input: Mapped[dict[str, Any]]
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    output: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    # Shown only to operators (admin pages, logs), never in the public answer.
    traceback: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    deadline_seconds: Mapped[float]
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    dispatched_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    webhook: Mapped[str | None] = mapped_column(String(2048))
    webhook_events_filter: Mapped[list[Any]] = mapped_column(JSON, default=lambda: ["completed"])
    # 0 (lowest) to 9 (highest): order among one tenant's queued jobs; between tenants the scheduler shares fairly.
    priority: Mapped[int] = mapped_column(Integer, default=5, server_default="5")
    # The job this one retries (POST /v1/jobs/{id}/retry); cleared if that job is purged.
    retry_of: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    # The W3C traceparent of the submitting request (db.tracing, when tracing is on): the worker's and
    # the webhook sender's spans of this job are its children, so one job is one trace.
    traceparent: Mapped[str | None] = mapped_column(String(55))

    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", order_by="Artifact.id", cascade="all, delete-orphan"
    )
    events: Mapped[list[JobEvent]] = relationship(order_by="JobEvent.id", cascade="all, delete-orphan")
    # The jobs made by retrying this one, oldest first (read only: the new job's ``retry_of`` is the link).
    retries: Mapped[list[Job]] = relationship(
        primaryjoin="Job.id == foreign(Job.retry_of)", order_by="Job.created_at", viewonly=True
    )


class JobCount(Base):
    """How many jobs have each type and status, as of the last compaction (PostgreSQL; see ``db.counts``)."""

    __tablename__ = "job_counts"

    type: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class JobCountDelta(Base):
    """A change of ``job_counts`` not compacted yet: +1 or -1, appended by a trigger on ``jobs`` (PostgreSQL).

    Appending rather than updating one counter row keeps concurrent transitions from queueing on its lock.
    """

    __tablename__ = "job_count_deltas"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    delta: Mapped[int] = mapped_column(Integer)


class GpuSeconds(Base):
    """A tenant's run time of jobs of a queue that finished in one 10-second bucket, as of the last compaction
    (PostgreSQL; see ``db.gpu_seconds``): the scheduler's fair share reads these, not the jobs."""

    __tablename__ = "gpu_seconds"

    queue: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    bucket: Mapped[datetime] = mapped_column(primary_key=True)
    seconds: Mapped[float]
    jobs: Mapped[int]


class GpuSecondsDelta(Base):
    """One finished job's run time not compacted into ``gpu_seconds`` yet, appended by a trigger on ``jobs``."""

    __tablename__ = "gpu_seconds_deltas"
    __table_args__ = (Index("ix_gpu_seconds_deltas_queue_tenant", "queue", "tenant_id", "bucket"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    queue: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(40))
    bucket: Mapped[datetime]
    seconds: Mapped[float]


class RetainedBytes(Base):
    """A tenant's bytes of unexpired artifacts, as of the last compaction (PostgreSQL; see ``db.retained``)."""

    __tablename__ = "retained_bytes"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)


class RetainedBytesDelta(Base):
    """A change of ``retained_bytes`` not compacted yet, appended by triggers on ``artifacts`` and ``jobs``."""

    __tablename__ = "retained_bytes_deltas"
    # A submit reads one tenant's deltas (quota check).
    __table_args__ = (Index("ix_retained_bytes_deltas_tenant", "tenant_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    delta: Mapped[int] = mapped_column(BigInteger)


class EventKind(str, enum.Enum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    CLAIMED = "claimed"
    PROGRESS = "progress"
    STORED = "stored"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELED = "canceled"
    REQUEUED = "requeued"
    RETRIED = "retried"  # an operator ran a failed or canceled job again (admin dashboard)
    CHECKPOINT = "checkpoint"  # a fine-tune stored its state (data: step, key); a requeued run resumes from it
    RESUMED = "resumed"  # a requeued fine-tune continued from a checkpoint (data: step)


class JobEvent(Base):
    """One line of a job's timeline: every status change and progress milestone."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[EventKind] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class Artifact(Base):
    """A stored output of a job: an S3 object whose size and sha256 were checked."""

    __tablename__ = "artifacts"
    __table_args__ = (
        UniqueConstraint("job_id", "name"),
        # Retention walks the artifacts not yet expired, oldest first, and stops at the TTL's cutoff.
        Index(
            "ix_artifacts_unexpired",
            "created_at",
            postgresql_where=text("expired_at IS NULL"),
            sqlite_where=text("expired_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(300))
    # When its job succeeded: the same time as the job's ``finished_at`` (retention's scan order).
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set when retention deleted the object from storage (the row stays: the job says its output expired).
    expired_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="artifacts")

    def describe(self) -> dict[str, Any]:
        """The Artifact as stored in a job's output (the API adds a fresh presigned ``url``)."""
        return {"name": self.name, "content_type": self.content_type, "size": self.size, "sha256": self.sha256}


class ModelOrigin(str, enum.Enum):
    """Where a model's weights come from (its ``kind`` on the wire)."""

    BASE = "base"  # a catalog entry (not a row: the catalog is the source of base models)
    LORA = "lora"


class Model(Base):
    """A tenant's fine-tuned model: a LoRA over a catalog base model, made by a ``finetune`` job.

    The weights are one object in storage (``models/<id>/pytorch_lora_weights.safetensors``),
    which is also the job's ``weights`` artifact; deleting the model deletes the object.
    """

    __tablename__ = "models"
    __table_args__ = (
        Index("ix_models_tenant_created", "tenant_id", "created_at", "id"),
        # Retention keeps a model's job and its weights object: both are looked up per batch.
        Index("ix_models_job_id", "job_id"),
        Index("ix_models_storage_key", "storage_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mdl"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[ModelOrigin] = mapped_column(String(16), default=ModelOrigin.LORA)
    base_model: Mapped[str] = mapped_column(String(200))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    storage_key: Mapped[str] = mapped_column(String(300))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # How it was made (rank, alpha, steps, resolution…), shown as is.
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorkerProcess(Base):
    """A worker process as its heartbeat last described it (silent for too long = lost)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[Any]]
    device: Mapped[dict[str, Any]]
    models: Mapped[dict[str, Any]]
    current_jobs: Mapped[list[Any]]
    # Jobs it runs at once (its concurrency): the scheduler's capacity of each queue it serves.
    slots: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Loading and warming its models at start (``worker.warm``): alive, but the scheduler counts no slots.
    warming: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    stopped_at: Mapped[datetime | None]


class WebhookSecret(Base):
    """A tenant's signing secret (``whsec_…``); after a rotation the previous one still signs until its grace ends."""

    __tablename__ = "webhook_secrets"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_valid_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rotated_at: Mapped[datetime | None]


class WebhookEvent(str, enum.Enum):
    START = "start"
    PROGRESS = "progress"
    COMPLETED = "completed"


class DeliveryStatus(str, enum.Enum):
    PENDING = "pending"  # waiting for its first attempt or its next retry
    DELIVERED = "delivered"  # a 2xx answer
    FAILED = "failed"  # stopped for good: 410 Gone, or a URL the SSRF guard refuses
    GAVE_UP = "gave_up"  # retried until the retry horizon (or superseded, for progress)


class BreakerState(str, enum.Enum):
    CLOSED = "closed"  # attempts go out, up to the endpoint's concurrency
    OPEN = "open"  # too many failures in a row: deliveries wait until ``open_until``
    HALF_OPEN = "half_open"  # one probe attempt at a time; its success closes the breaker, a failure opens it again


class WebhookEndpoint(Base):
    """Where one tenant's webhooks go (``scheme://host:port``): the unit of concurrency, of fair turns, of the breaker.

    The id is derived from the tenant and the origin (``db.endpoints.endpoint_id``), so recording a
    delivery needs no lookup. Attempts in flight are not counted here but in the deliveries
    (``claimed_until``), so a dead sender's slot frees itself when its claim runs out.
    """

    __tablename__ = "webhook_endpoints"
    __table_args__ = (UniqueConstraint("tenant_id", "origin"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    origin: Mapped[str] = mapped_column(String(300))
    state: Mapped[BreakerState] = mapped_column(String(16), default=BreakerState.CLOSED)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    # Times the breaker opened since it last closed: each one doubles the next open period.
    trips: Mapped[int] = mapped_column(Integer, default=0)
    open_until: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    # When a sender last took one of its deliveries: the round-robin order between endpoints.
    last_turn_at: Mapped[datetime | None]
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event of one job, to be sent to the job's webhook: the unit of retry and of ``webhook-id``.

    ``start`` and ``completed`` have ``sequence`` 0, so the unique constraint allows one each per job;
    ``progress`` deliveries count 1, 2, … (and so does ``completed``, each time an operator's retry
    finishes the job again).
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "event", "sequence"),
        Index("ix_webhook_deliveries_status_next_attempt", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_job_created", "job_id", "created_at", "id"),
        Index("ix_webhook_deliveries_endpoint_status_next_attempt", "endpoint_id", "status", "next_attempt_at"),
    )

    # Also the ``webhook-id`` header: the same on every attempt, redeliveries included.
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("msg"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[WebhookEvent] = mapped_column(String(16))
    sequence: Mapped[int] = mapped_column(Integer, default=0)
    # The job as ``GET /v1/jobs/{id}`` showed it when the event happened, without artifact URLs
    # (those are presigned afresh for every attempt, so a late retry does not carry expired links).
    payload: Mapped[dict[str, Any]]
    status: Mapped[DeliveryStatus] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # A series of attempts is retried with backoff until the retry horizon; a redelivery starts a new one.
    series_started_at: Mapped[datetime] = mapped_column(default=utcnow)
    series_first_attempt: Mapped[int] = mapped_column(Integer, default=1)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]
    # Where it goes (``None`` only for a job without a webhook URL), and until when an attempt holds it:
    # the attempts in flight to an endpoint are its deliveries whose claim has not run out.
    endpoint_id: Mapped[str | None] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    claimed_until: Mapped[datetime | None]

    history: Mapped[list[WebhookAttempt]] = relationship(
        order_by="WebhookAttempt.number", cascade="all, delete-orphan", passive_deletes=True
    )


class WebhookAttempt(Base):
    """One HTTP request of a delivery and what came of it."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "number"), Index("ix_webhook_attempts_at", "at"))

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    duration_seconds: Mapped[float]
