"""The retention queries: which artifacts are due to expire, which input files and which jobs are due to be
deleted, and the writes.

``worker/retention.py`` drives them, one bounded batch per transaction, deleting the objects from storage
between the select and the write. The selects lock what they return with ``FOR UPDATE SKIP LOCKED``
(PostgreSQL), so two retention runs at once take disjoint batches and neither waits; on SQLite (one
process writes at a time) the writes are conditional, so a second run changes nothing the first did.

Ages are measured on the database's clock (``db.clock``), like leases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Delete, and_, delete, exists, func, select, update
from sqlalchemy.orm import Session

from db import clock
from db.models import (
    FINISHED,
    Artifact,
    DeliveryStatus,
    EventKind,
    File,
    Job,
    JobEvent,
    JobStatus,
    Model,
    TenantQuota,
    WebhookAttempt,
    WebhookDelivery,
)

FINISHED_VALUES = sorted(status.value for status in FINISHED)
ACTIVE = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
ACTIVE_JOB_MARGIN_SECONDS = 3600  # files used this long before the oldest active job's creation are kept


@dataclass(frozen=True)
class TtlScope:
    """The tenants whose outputs are kept ``seconds``: those named in ``tenants``, or (``tenants`` None) every
    tenant but ``excluded`` (the tenants with an override of their own)."""

    seconds: int
    tenants: tuple[str, ...] | None
    excluded: tuple[str, ...] = ()


def ttl_scopes(session: Session, default_seconds: int) -> list[TtlScope]:
    """One scope per distinct artifact TTL in force (0, "forever", has none): the overrides, then the default."""
    overrides = session.execute(
        select(TenantQuota.tenant_id, TenantQuota.artifact_ttl_seconds).where(
            TenantQuota.artifact_ttl_seconds.is_not(None)
        )
    ).all()
    by_ttl: dict[int, list[str]] = {}
    for tenant_id, seconds in overrides:
        by_ttl.setdefault(int(seconds or 0), []).append(tenant_id)
    scopes = [TtlScope(seconds, tuple(tenants)) for seconds, tenants in sorted(by_ttl.items()) if seconds > 0]
    if default_seconds > 0:
        scopes.append(TtlScope(default_seconds, None, tuple(tenant_id for tenant_id, _ in overrides)))
    return scopes


@dataclass(frozen=True)
class Due:
    artifact_id: int
    job_id: str
    storage_key: str


def due_artifacts(session: Session, scope: TtlScope, limit: int) -> list[Due]:
    """Up to ``limit`` unexpired artifacts of jobs that ended more than ``scope.seconds`` ago, oldest first, locked.

    An artifact's ``created_at`` is its job's ``finished_at`` (both written by the ``succeed`` transition), so
    the scan walks the partial index of unexpired artifacts in that order and stops at the cutoff; the job's
    own ``finished_at`` is still the rule."""
    cutoff = clock.now(session, -scope.seconds)
    query = (
        select(Artifact.id, Artifact.job_id, Artifact.storage_key)
        .join(Job, Job.id == Artifact.job_id)
        .where(
            Artifact.expired_at.is_(None),
            Artifact.created_at < cutoff,
            Job.status.in_(FINISHED_VALUES),
            Job.finished_at < cutoff,
        )
        .order_by(Artifact.created_at)
    )
    if scope.tenants is not None:
        query = query.where(Job.tenant_id.in_(scope.tenants))
    elif scope.excluded:
        query = query.where(Job.tenant_id.not_in(scope.excluded))
    query = query.limit(limit).with_for_update(of=Artifact, skip_locked=True)
    return [Due(artifact_id, job_id, key) for artifact_id, job_id, key in session.execute(query).all()]


def model_keys(session: Session, keys: Sequence[str]) -> set[str]:
    """Which of ``keys`` are a model's weights: those objects belong to the model and are never deleted here."""
    if not keys:
        return set()
    return set(session.scalars(select(Model.storage_key).where(Model.storage_key.in_(list(set(keys))))))


def mark_expired(session: Session, artifact_ids: Sequence[int]) -> int:
    """Record that these artifacts' objects are gone (only those not marked yet); how many were marked."""
    if not artifact_ids:
        return 0
    result = session.execute(
        update(Artifact)
        .where(Artifact.id.in_(list(artifact_ids)), Artifact.expired_at.is_(None))
        .values(expired_at=clock.now(session))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def due_jobs(session: Session, age_seconds: int, limit: int) -> list[str]:
    """Up to ``limit`` finished jobs that ended more than ``age_seconds`` ago, oldest first, locked.

    Never a queued or running job, never a job a model row points to (the model says which job made it), and
    not while a webhook delivery of the job is still being retried (it is purged once that one ends).
    """
    made_a_model = exists().where(Model.job_id == Job.id)
    webhook_pending = exists().where(
        WebhookDelivery.job_id == Job.id, WebhookDelivery.status == DeliveryStatus.PENDING.value
    )
    query = (
        select(Job.id)
        .where(
            Job.status.in_(FINISHED_VALUES),
            Job.finished_at < clock.now(session, -age_seconds),
            ~made_a_model,
            ~webhook_pending,
        )
        .order_by(Job.finished_at)
        .limit(limit)
        .with_for_update(of=Job, skip_locked=True)
    )
    return list(session.scalars(query))


def stored_keys(session: Session, job_ids: Sequence[str]) -> list[str]:
    """The objects of these jobs' artifacts that are still stored (expired ones are gone already), locked.

    The lock waits for an expiry batch that holds some of them (it is deleting their objects now) and then
    sees them expired, so the two never delete one object twice."""
    if not job_ids:
        return []
    query = (
        select(Artifact.storage_key)
        .where(Artifact.job_id.in_(list(job_ids)), Artifact.expired_at.is_(None))
        .with_for_update(of=Artifact)
    )
    return list(session.scalars(query))


def checkpointed(session: Session, job_ids: Sequence[str]) -> list[str]:
    """Which of these jobs stored checkpoints (a fine-tune that did not succeed may have left them)."""
    if not job_ids:
        return []
    return list(
        session.scalars(
            select(JobEvent.job_id)
            .where(JobEvent.job_id.in_(list(job_ids)), JobEvent.kind == EventKind.CHECKPOINT.value)
            .distinct()
        )
    )


@dataclass
class Purged:
    jobs: int = 0
    events: int = 0
    artifacts: int = 0
    deliveries: int = 0
    attempts: int = 0


def purge(session: Session, job_ids: Sequence[str]) -> Purged:
    """Delete these jobs and every row that hangs off them, children first: one short statement per table.

    The jobs must still be finished and unreferenced by a model (re-checked here, so a row that changed since
    it was selected is left alone along with its children)."""
    ids = list(job_ids)
    if not ids:
        return Purged()
    still = select(Job.id).where(
        Job.id.in_(ids),
        Job.status.in_(FINISHED_VALUES),
        ~exists().where(Model.job_id == Job.id),
    )
    ids = list(session.scalars(still))
    if not ids:
        return Purged()
    deliveries = select(WebhookDelivery.id).where(WebhookDelivery.job_id.in_(ids))

    def remove(statement: Delete) -> int:
        result = session.execute(statement.execution_options(synchronize_session=False))
        return int(getattr(result, "rowcount", 0) or 0)

    return Purged(
        attempts=remove(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(deliveries))),
        deliveries=remove(delete(WebhookDelivery).where(WebhookDelivery.job_id.in_(ids))),
        events=remove(delete(JobEvent).where(JobEvent.job_id.in_(ids))),
        artifacts=remove(delete(Artifact).where(Artifact.job_id.in_(ids))),
        jobs=remove(delete(Job).where(and_(Job.id.in_(ids), Job.status.in_(FINISHED_VALUES)))),
    )


@dataclass(frozen=True)
class DueFile:
    file_id: str
    storage_key: str


def due_files(session: Session, ttl_seconds: int, limit: int) -> list[DueFile]:
    """Up to ``limit`` input files that no job named for ``ttl_seconds``, least recently used first, locked.

    ``used_at`` is set by every submit that names the file, in the job's transaction. A queued or running job
    can be older than the TTL (a long backlog, an operator's retry), so the cutoff is also kept before the
    oldest such job's creation: every file it names was used when it was created (its submit sets both
    ``used_at`` and the job's ``created_at`` to the database's time of the same transaction), so none of
    them is taken. ``ACTIVE_JOB_MARGIN_SECONDS`` keeps a margin under that: a job row made another way (a
    ``created_at`` given by its writer) may be a little younger than its files' use. The rows a submit is
    marking now are locked by it and skipped (``SKIP LOCKED``); the submit commits its job after that."""
    # One MIN per status: each is the first entry of ``ix_jobs_status_created``, however long the backlog.
    oldest = [select(func.min(Job.created_at)).where(Job.status == status).scalar_subquery() for status in ACTIVE]
    conditions = [File.used_at < clock.now(session, -ttl_seconds)]
    for created_at in session.execute(select(*oldest)).one():
        if created_at is not None:
            conditions.append(File.used_at < created_at - timedelta(seconds=ACTIVE_JOB_MARGIN_SECONDS))
    query = (
        select(File.id, File.storage_key)
        .where(*conditions)
        .order_by(File.used_at, File.id)
        .limit(limit)
        .with_for_update(of=File, skip_locked=True)
    )
    return [DueFile(file_id, key) for file_id, key in session.execute(query).all()]


def delete_files(session: Session, file_ids: Sequence[str]) -> int:
    """Delete these files' rows (their objects are gone); how many were deleted."""
    if not file_ids:
        return 0
    result = session.execute(
        delete(File).where(File.id.in_(list(file_ids))).execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)
