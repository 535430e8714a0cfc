"""What a tenant uses now, as its quotas count it: queued jobs, running jobs per queue, retained artifact bytes.

Every count reads an index (``ix_jobs_tenant_status_queue``), and the count a submit checks stops at the
limit, so a tenant with a long backlog costs no more than the limit. Retained bytes are a running total per
tenant (``db.retained``), not a sum over the tenant's artifacts.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ScalarSelect, func, select
from sqlalchemy.orm import Session

from db import retained
from db.models import Job, JobStatus


@dataclass
class Usage:
    queued_jobs: int = 0
    running_jobs: dict[str, int] = field(default_factory=dict)  # queue → jobs running on it
    retained_bytes: int = 0


def queued_jobs(session: Session, tenant_id: str, up_to: int | None = None) -> int:
    """The tenant's queued jobs; counting stops at ``up_to`` (a submit only needs to know if it is reached)."""
    return int(session.execute(select(queued_count(tenant_id, up_to))).scalar_one())


def queued_count(tenant_id: Any, up_to: Any = None) -> ScalarSelect[int]:
    """``queued_jobs`` as a scalar subquery, for a caller that reads it with other values in one statement
    (``tenant_id`` and ``up_to`` may be bind parameters, for a statement built once)."""
    # Only indexed columns: PostgreSQL answers from the index (an index-only scan), without reading rows.
    rows = select(Job.tenant_id).where(Job.tenant_id == tenant_id, Job.status == JobStatus.QUEUED.value)
    if up_to is not None:
        rows = rows.limit(up_to)
    return select(func.count()).select_from(rows.subquery()).scalar_subquery()


def retained_bytes(session: Session, tenant_id: str) -> int:
    """Bytes of the tenant's stored artifacts that retention has not expired."""
    return retained.retained(session, [tenant_id]).get(tenant_id, 0)


def usage(session: Session, tenant_ids: Collection[str]) -> dict[str, Usage]:
    """Each tenant's usage, in two queries whatever the number of tenants."""
    ids = list(dict.fromkeys(tenant_ids))
    found = {tenant_id: Usage() for tenant_id in ids}
    if not ids:
        return found
    active = [JobStatus.QUEUED.value, JobStatus.RUNNING.value]
    counts = session.execute(
        select(Job.tenant_id, Job.status, Job.queue, func.count())
        .where(Job.tenant_id.in_(ids), Job.status.in_(active))
        .group_by(Job.tenant_id, Job.status, Job.queue)
    )
    for tenant_id, status, queue, count in counts:
        if status == JobStatus.QUEUED.value:
            found[tenant_id].queued_jobs += count
        else:
            found[tenant_id].running_jobs[queue] = count
    for tenant_id, total in retained.retained(session, ids).items():
        found[tenant_id].retained_bytes = total
    return found
