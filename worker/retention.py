"""Retention (on beat, the ``maintenance`` queue): finished jobs' outputs expire, and old jobs are purged.

- **Expiry.** An artifact of a job that ended more than its tenant's TTL ago (``GPUJOBS_ARTIFACT_TTL``, or
  the tenant's ``artifact_ttl_seconds``) has its object deleted from storage and is marked ``expired_at``;
  the row stays, so the job says its outputs expired. A key that is a model's weights (a fine-tune's
  ``weights`` artifact) is marked but its object kept: it belongs to the model, which must keep working.
- **Unused inputs.** An uploaded file that no job named for ``GPUJOBS_FILE_TTL`` (counted from the last
  submit that named it, or its upload) has its object and its row deleted; never one a queued or running
  job needs.
- **Purge.** A job that ended more than ``GPUJOBS_JOB_RETENTION`` ago is deleted with its events,
  artifacts and webhook deliveries, its stored objects first (never a job a model points to).

Each batch is one transaction: select and lock (``SKIP LOCKED``) at most ``retention_batch_size`` rows,
delete their objects from storage, then write. If storage fails the transaction is rolled back: nothing is
marked expired or purged whose object was not deleted, and the next run tries again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from db import retention
from db.session import session_scope
from db.settings import Settings, get_settings
from db.storage import Storage, StorageError, get_storage

log = logging.getLogger(__name__)


@dataclass
class RetentionReport:
    artifacts_expired: int = 0
    objects_deleted: int = 0
    objects_kept_for_models: int = 0  # expired on their job, kept for the model that owns them
    files_deleted: int = 0
    jobs_purged: int = 0
    events_purged: int = 0
    deliveries_purged: int = 0
    storage_errors: int = 0  # batches rolled back because storage failed (tried again on the next run)
    more: bool = False  # a batch came back full: there may be more to do now

    def add(self, other: RetentionReport) -> None:
        for field in fields(self):
            if field.name == "more":
                continue
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        self.more = other.more

    def counts(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in fields(self) if field.name != "more"}


def expire_batch(settings: Settings, storage: Storage, report: RetentionReport) -> None:
    """Expire at most ``retention_batch_size`` artifacts, in one transaction."""
    limit = settings.retention_batch_size
    with session_scope() as session:
        due: list[retention.Due] = []
        for scope in retention.ttl_scopes(session, settings.artifact_ttl):
            due += retention.due_artifacts(session, scope, limit - len(due))
            if len(due) >= limit:
                break
        if not due:
            return
        kept = retention.model_keys(session, [d.storage_key for d in due])
        doomed = [d.storage_key for d in due if d.storage_key not in kept]
        # Storage first: an error here rolls the transaction back, so nothing is marked that still exists.
        report.objects_deleted += storage.delete_many(doomed)
        report.objects_kept_for_models += sum(1 for d in due if d.storage_key in kept)
        report.artifacts_expired += retention.mark_expired(session, [d.artifact_id for d in due])
        report.more = len(due) >= limit


def files_batch(settings: Settings, storage: Storage, report: RetentionReport) -> None:
    """Delete at most ``retention_batch_size`` input files unused for ``file_ttl``, in one transaction."""
    if settings.file_ttl <= 0:
        return
    limit = settings.retention_batch_size
    with session_scope() as session:
        due = retention.due_files(session, settings.file_ttl, limit)
        if not due:
            return
        # Storage first: an error here rolls the transaction back, so no row goes whose object still exists.
        report.objects_deleted += storage.delete_many([d.storage_key for d in due])
        report.files_deleted += retention.delete_files(session, [d.file_id for d in due])
        report.more = report.more or len(due) >= limit


def purge_batch(settings: Settings, storage: Storage, report: RetentionReport) -> None:
    """Purge at most ``retention_batch_size`` jobs older than ``job_retention``, in one transaction."""
    if settings.job_retention <= 0:
        return
    limit = settings.retention_batch_size
    with session_scope() as session:
        job_ids = retention.due_jobs(session, settings.job_retention, limit)
        if not job_ids:
            return
        keys = retention.stored_keys(session, job_ids)
        kept = retention.model_keys(session, keys)
        report.objects_deleted += storage.delete_many([key for key in keys if key not in kept])
        # A fine-tune that never succeeded may have left checkpoints: not rows, so deleted by prefix.
        for job_id in retention.checkpointed(session, job_ids):
            report.objects_deleted += storage.delete_prefix(f"jobs/{job_id}/checkpoints/")
        purged = retention.purge(session, job_ids)
        report.jobs_purged += purged.jobs
        report.events_purged += purged.events
        report.deliveries_purged += purged.deliveries
        report.more = report.more or len(job_ids) >= limit


def retention_batch(settings: Settings | None = None, storage: Storage | None = None) -> RetentionReport:
    """One batch of expiry, one of unused files and one of purging (each at most ``retention_batch_size`` rows,
    each its own transaction); a storage failure in any is logged and counted, and leaves that batch for the next
    run."""
    settings = settings or get_settings()
    storage = storage or get_storage(settings)
    report = RetentionReport()
    for step in (expire_batch, files_batch, purge_batch):
        try:
            step(settings, storage, report)
        except StorageError as exc:
            log.warning("retention: %s left for the next run: %s", step.__name__, exc)
            report.storage_errors += 1
    return report


def run(settings: Settings | None = None) -> RetentionReport:
    """The beat task: batches until one comes back short, storage fails, or ``retention_max_batches``."""
    settings = settings or get_settings()
    total = RetentionReport()
    for _ in range(settings.retention_max_batches):
        report = retention_batch(settings)
        total.add(report)
        if not report.more or report.storage_errors:
            break
    if any(total.counts().values()):
        log.info("retention: %s", total.counts())
    return total
