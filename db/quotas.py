"""A tenant's effective scheduling weight, quotas and retention: its ``tenant_quotas`` row over the defaults.

Every field of a ``TenantQuota`` row that is NULL falls back to its setting (``GPUJOBS_TENANT_WEIGHT``,
``GPUJOBS_QUOTA_*``, ``GPUJOBS_ARTIFACT_TTL``). For the quotas, 0 means "no limit", as in the settings.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, literal, select
from sqlalchemy.orm import Session

from db import usage
from db.models import TenantQuota
from db.settings import Settings

FIELDS = (
    "weight",
    "max_queued_jobs",
    "max_running_jobs",
    "submits_per_minute",
    "max_retained_bytes",
    "artifact_ttl_seconds",
)
QUOTAS = cast(Table, TenantQuota.__table__)


@dataclass(frozen=True)
class Quotas:
    weight: float
    max_queued_jobs: int  # 0: no limit
    max_running_jobs: int  # per queue; 0: no limit
    submits_per_minute: int  # 0: no limit
    max_retained_bytes: int  # 0: no limit
    artifact_ttl_seconds: int  # 0: kept forever


def defaults(settings: Settings) -> Quotas:
    return Quotas(
        weight=settings.tenant_weight,
        max_queued_jobs=settings.quota_max_queued_jobs,
        max_running_jobs=settings.quota_max_running_jobs,
        submits_per_minute=settings.quota_submits_per_minute,
        max_retained_bytes=settings.quota_max_retained_bytes,
        artifact_ttl_seconds=settings.artifact_ttl,
    )


def merge(row: Any, settings: Settings) -> Quotas:
    """``row``'s fields (a ``TenantQuota``, or any row with the ``FIELDS`` as attributes) over the defaults."""
    base = defaults(settings)
    if row is None:
        return base
    values = {name: getattr(row, name) for name in FIELDS}
    return Quotas(**{name: getattr(base, name) if value is None else value for name, value in values.items()})


def effective(session: Session, tenant_ids: Iterable[str], settings: Settings) -> dict[str, Quotas]:
    """Each tenant's quotas, in one query (tenants without a row get the defaults)."""
    ids = list(dict.fromkeys(tenant_ids))
    if not ids:
        return {}
    rows = {row.tenant_id: row for row in session.scalars(select(TenantQuota).where(TenantQuota.tenant_id.in_(ids)))}
    return {tenant_id: merge(rows.get(tenant_id), settings) for tenant_id in ids}


@functools.cache
def _at_submit(counted: bool) -> Any:
    """The tenant's quota row (NULLs without one) and, if ``counted``, its queued jobs up to ``up_to``: one
    statement, built once (a submit's hot path)."""
    tenant_id = bindparam("tenant_id", type_=QUOTAS.c.tenant_id.type)
    overrides = [QUOTAS.c[name].label(name) for name in FIELDS]
    count = [usage.queued_count(tenant_id, bindparam("up_to")).label("queued")] if counted else []
    one = select(literal(1).label("one")).subquery()
    return select(*overrides, *count).select_from(one.outerjoin(QUOTAS, QUOTAS.c.tenant_id == tenant_id))


def at_submit(session: Session, tenant_id: str, settings: Settings) -> tuple[Quotas, int | None]:
    """The tenant's quotas and its queued jobs (counted up to its ``max_queued_jobs``; None when that is 0), in
    one statement for a tenant on the default ``max_queued_jobs``: the quota row and a count up to the default
    limit are read together (a submit's hot path). A tenant with its own limit costs a second count."""
    default_limit = settings.quota_max_queued_jobs
    row = session.execute(_at_submit(bool(default_limit)), {"tenant_id": tenant_id, "up_to": default_limit}).one()
    quotas = merge(row, settings)
    if not quotas.max_queued_jobs:
        return quotas, None
    if default_limit and quotas.max_queued_jobs == default_limit:
        return quotas, int(row.queued)
    return quotas, usage.queued_jobs(session, tenant_id, up_to=quotas.max_queued_jobs)
