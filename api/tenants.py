"""/v1/tenants: each tenant's quotas (effective values and an admin's overrides) and what it uses now.

Admin keys list and read every tenant and set or clear its overrides; a user key reads its own
tenant only (any other is a 404, as for jobs). The overrides are the ``tenant_quotas`` row; a field
that is null there (or cleared with ``null``) takes the ``GPUJOBS_QUOTA_*`` / ``GPUJOBS_ARTIFACT_TTL``
/ ``GPUJOBS_TENANT_WEIGHT`` default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from flask import Blueprint, Response, g, jsonify
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import config, quotas
from api.auth import current_key, is_admin, require_admin
from api.body import json_object
from api.errors import ApiError, from_pydantic
from api.openapi import document
from api.presenters import page_params, paginate, rfc3339
from db import usage
from db.models import Tenant, TenantQuota, utcnow
from db.quotas import FIELDS, effective

bp = Blueprint("tenants", __name__, url_prefix="/v1/tenants")

MAX_QUEUED_JOBS = 10_000_000
MAX_RUNNING_JOBS = 100_000
MAX_SUBMITS_PER_MINUTE = 1_000_000
MAX_RETAINED_BYTES = 10**15  # 1 PB
MAX_ARTIFACT_TTL_SECONDS = 10 * 365 * 86400  # ten years
MAX_WEIGHT = 1000.0  # as GPUJOBS_TENANT_WEIGHT


def _count(maximum: int, description: str) -> Any:
    return Field(None, strict=True, ge=0, le=maximum, description=f"{description} (0: no limit; null: the default).")


class QuotaUpdate(BaseModel):
    """The body of ``PUT /v1/tenants/{id}/quotas``: any of the six overrides; ``null`` clears one."""

    model_config = ConfigDict(extra="forbid")

    weight: Annotated[float, Field(strict=True, gt=0, le=MAX_WEIGHT, allow_inf_nan=False)] | None = Field(
        None, description="Fair-share weight (twice the weight, twice the GPU time when tenants wait; null: default)."
    )
    max_queued_jobs: int | None = _count(MAX_QUEUED_JOBS, "Most queued jobs; past it a submit is a 429")
    max_running_jobs: int | None = _count(MAX_RUNNING_JOBS, "Most jobs running at once on each queue")
    submits_per_minute: int | None = _count(MAX_SUBMITS_PER_MINUTE, "Job submits a minute, all keys together")
    max_retained_bytes: int | None = _count(MAX_RETAINED_BYTES, "Most bytes of unexpired job outputs")
    artifact_ttl_seconds: int | None = Field(
        None,
        strict=True,
        ge=0,
        le=MAX_ARTIFACT_TTL_SECONDS,
        description="Seconds a finished job's outputs are kept (0: forever; null: the default).",
    )


def parse_update(body: dict[str, Any], prefix: Sequence[str | int] = ("body",)) -> dict[str, Any]:
    """The overrides to change (field → value or None), or a 422 naming the first wrong field."""
    try:
        spec = QuotaUpdate.model_validate(body)
    except ValidationError as exc:
        raise from_pydantic(exc, list(prefix)) from None
    return {name: getattr(spec, name) for name in FIELDS if name in spec.model_fields_set}


def set_overrides(session: Session, tenant_id: str, changes: dict[str, Any]) -> None:
    """Apply ``changes`` to the tenant's row (made if missing, removed when nothing is left overridden); commits."""
    for attempt in range(2):
        row = session.get(TenantQuota, tenant_id, populate_existing=True)
        if row is None:
            if all(value is None for value in changes.values()):
                return  # nothing overridden, nothing to clear
            row = TenantQuota(tenant_id=tenant_id)
            session.add(row)
        for name, value in changes.items():
            setattr(row, name, value)
        row.updated_at = utcnow()
        if all(getattr(row, name) is None for name in FIELDS):
            session.delete(row)  # only a stored row can end up empty: a new one holds a value
        try:
            session.commit()
            return
        except IntegrityError:  # another request made the row at the same moment: update that one
            session.rollback()
            if attempt:
                raise


def tenants_json(session: Session, tenants: list[Tenant]) -> list[dict[str, Any]]:
    """Tenants as the API shows them: quotas, overrides and usage, in a few queries for the whole list."""
    settings = config.settings()
    ids = [tenant.id for tenant in tenants]
    found = effective(session, ids, settings)
    rows = {row.tenant_id: row for row in session.scalars(select(TenantQuota).where(TenantQuota.tenant_id.in_(ids)))}
    used = usage.usage(session, ids)
    counted = quotas.submits_this_minute([i for i in ids if found[i].submits_per_minute], settings)
    return [
        {
            "id": tenant.id,
            "name": tenant.name,
            "created_at": rfc3339(tenant.created_at),
            "quotas": {name: getattr(found[tenant.id], name) for name in FIELDS},
            "overrides": {
                name: getattr(rows[tenant.id], name)
                for name in FIELDS
                if tenant.id in rows and getattr(rows[tenant.id], name) is not None
            },
            "usage": {
                "queued_jobs": used[tenant.id].queued_jobs,
                "running_jobs": used[tenant.id].running_jobs,
                # Counted only while the tenant has a submits_per_minute quota (null otherwise, or without Redis).
                "submits_last_minute": counted.get(tenant.id),
                "retained_bytes": used[tenant.id].retained_bytes,
            },
        }
        for tenant in tenants
    ]


def _visible_tenant(tenant_id: str) -> Tenant:
    tenant: Tenant | None = g.db.get(Tenant, tenant_id) if is_admin() or tenant_id == current_key().tenant_id else None
    if tenant is None:
        raise ApiError(404, f"No tenant {tenant_id!r}.")
    return tenant


@bp.get("")
@require_admin
@document("List tenants with their quotas and usage (admin)", query=["limit", "cursor"], responses={200: "TenantList"})
def list_tenants() -> Response:
    limit, cursor = page_params()
    rows, next_cursor = paginate(select(Tenant), Tenant, limit, cursor)
    return jsonify({"items": tenants_json(g.db, rows), "next_cursor": next_cursor})


@bp.get("/<tenant_id>")
@document("Get a tenant's quotas and usage (a user key: its own tenant only)", responses={200: "Tenant"})
def get_tenant(tenant_id: str) -> Response:
    return jsonify(tenants_json(g.db, [_visible_tenant(tenant_id)])[0])


@bp.put("/<tenant_id>/quotas")
@require_admin
@document(
    "Set or clear a tenant's quota overrides (admin); `null` clears one (back to the default)",
    body=QuotaUpdate,
    responses={200: "Tenant"},
)
def put_quotas(tenant_id: str) -> Response:
    tenant = _visible_tenant(tenant_id)
    changes = parse_update(json_object())
    set_overrides(g.db, tenant.id, changes)
    return jsonify(tenants_json(g.db, [tenant])[0])
