"""The dashboard's pages: overview, workers, jobs (list and one job), tenants (list and one), keys. Read-only."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import Any

from flask import Response, g, redirect, render_template, request, url_for
from sqlalchemy import or_, select
from sqlalchemy.orm import selectinload
from werkzeug.wrappers import Response as BaseResponse

from api import config, events, stats
from api.admin import charts
from api.admin.blueprint import bp
from api.admin.session import current_admin
from api.errors import ApiError, validation_error
from api.presenters import ID, page_params, paginate
from api.tenants import tenants_json
from db import endpoints
from db import usage as tenant_usage
from db.models import (
    ApiKey,
    Artifact,
    BreakerState,
    File,
    Job,
    JobStatus,
    Tenant,
    TenantQuota,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from db.quotas import FIELDS as QUOTA_FIELDS
from db.quotas import defaults as quota_defaults
from db.quotas import effective

WINDOWS = {"1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
THROUGHPUT_BARS = 36
FILE_ID = re.compile(r"^file_[A-Za-z0-9_-]{1,64}$")


@bp.app_template_filter("utc")
def utc(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "–"


@bp.app_template_filter("ago")
def ago(value: datetime | None) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago`` (``in …`` for a future time)."""
    if value is None:
        return "–"
    seconds = (utcnow() - value).total_seconds()
    text = duration(abs(seconds), coarse=True)
    return f"{text} ago" if seconds >= 0 else f"in {text}"


@bp.app_template_filter("duration")
def duration(seconds: float | None, coarse: bool = False) -> str:
    if seconds is None:
        return "–"
    if seconds < 1 and not coarse:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.0f} s" if coarse or seconds >= 10 else f"{seconds:.2f}".rstrip("0").rstrip(".") + " s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min" if coarse else f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _window(name: str, default: str) -> tuple[str, int]:
    value = request.args.get(name) or default
    if value not in WINDOWS:
        raise validation_error(["query", name], f"must be one of {', '.join(WINDOWS)}")
    return value, WINDOWS[value]


# --- overview ---------------------------------------------------------------------------------------


@bp.get("/")
def overview() -> str:
    settings = config.settings()
    window, seconds = _window("window", "1h")
    now = utcnow()
    since = now - timedelta(seconds=seconds)
    depths, broker_error = stats.broker_queue_depths()
    in_flight = stats.in_flight(g.db)
    finished = stats.finished_since(g.db, since)
    types = sorted({t for t, _ in in_flight} | {t for t, _ in finished})
    bucket_seconds = max(60, seconds // THROUGHPUT_BARS)
    throughput = stats.throughput(g.db, since, now, bucket_seconds)
    workers = stats.workers(g.db, settings.worker_lost_seconds, now - timedelta(days=1))
    recent_failures = g.db.scalars(
        select(Job)
        .where(Job.status == JobStatus.FAILED.value, Job.finished_at.is_not(None))  # not the NULLs first
        .order_by(Job.finished_at.desc())
        .limit(5)
    ).all()
    return render_template(
        "admin/overview.html",
        window=window,
        windows=list(WINDOWS),
        depths=depths,
        broker_error=broker_error,
        db_queued=stats.queued_by_queue(g.db),
        queue_health=stats.queue_health(g.db, settings.worker_lost_seconds),
        types=types,
        in_flight=in_flight,
        running=sum(count for (_, status), count in in_flight.items() if status == JobStatus.RUNNING.value),
        finished=finished,
        finished_totals=_totals(finished),
        failure_rate=stats.failure_rate(finished),
        waits=stats.percentiles(g.db, "queue_wait", since),
        runs=stats.percentiles(g.db, "run", since),
        percentiles=stats.PERCENTILES,
        depth_chart=charts.horizontal_bars(
            [(queue, depths.get(queue, 0)) for queue in sorted(depths)], unit="messages"
        ),
        throughput_chart=charts.stacked_columns(
            throughput, ["succeeded", "failed", "canceled"], bucket_seconds=bucket_seconds
        ),
        alive=sum(1 for w in workers if w.state == "alive"),
        lost=sum(1 for w in workers if w.state == "lost"),
        recent_failures=recent_failures,
        troubled_endpoints=g.db.scalars(
            select(WebhookEndpoint)
            .where(or_(WebhookEndpoint.state != BreakerState.CLOSED.value, WebhookEndpoint.consecutive_failures > 0))
            .order_by(WebhookEndpoint.changed_at.desc())
            .limit(20)
        ).all(),
    )


def _totals(counts: dict[tuple[str, str], int]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for (_, status), count in counts.items():
        totals[status] = totals.get(status, 0) + count
    return totals


# --- workers ---------------------------------------------------------------------------------------------


@bp.get("/workers")
def workers() -> str:
    settings = config.settings()
    window, seconds = _window("seen", "24h")
    rows = stats.workers(g.db, settings.worker_lost_seconds, utcnow() - timedelta(seconds=seconds))
    warm: dict[str, list[str]] = {}
    for worker in rows:
        if worker.state == "alive":
            for name in worker.warm_models:
                warm.setdefault(name, []).append(worker.row.id)
    return render_template(
        "admin/workers.html",
        workers=rows,
        warm=dict(sorted(warm.items())),
        lost_after=settings.worker_lost_seconds,
        heartbeat=settings.heartbeat_seconds,
        window=window,
        windows=list(WINDOWS),
    )


# --- jobs --------------------------------------------------------------------------------------------------


@dataclass
class JobFilters:
    status: str = ""
    type: str = ""
    tenant: str = ""
    since: str = ""
    until: str = ""

    def args(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v}


def _time_arg(name: str) -> datetime | None:
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (ValueError, OverflowError):  # not a time, or one that leaves the calendar once made UTC
        raise validation_error(["query", name], "must be a date and time such as 2025-01-31T14:05 (UTC)") from None


@bp.get("/jobs")
def jobs() -> str | BaseResponse:
    search = request.args.get("q", "").strip()
    if search:
        if not ID.fullmatch(search):
            raise validation_error(["query", "q"], "a job id has only letters, digits, `_` and `-`")
        if g.db.get(Job, search) is not None:
            return redirect(url_for("admin.job", job_id=search), 303)
    filters = JobFilters(
        status=request.args.get("status", ""),
        type=request.args.get("type", ""),
        tenant=request.args.get("tenant", "").strip(),
        since=request.args.get("since", "").strip(),
        until=request.args.get("until", "").strip(),
    )
    query = select(Job).options(selectinload(Job.artifacts))
    if search:  # not an exact id: the ids that start with it
        query = query.where(Job.id.startswith(search, autoescape=True))
    if filters.status:
        if filters.status not in {s.value for s in JobStatus}:
            raise validation_error(["query", "status"], f"must be one of {', '.join(s.value for s in JobStatus)}")
        query = query.where(Job.status == filters.status)
    if filters.type:
        if not ID.fullmatch(filters.type):
            raise validation_error(["query", "type"], "is not a job type")
        query = query.where(Job.type == filters.type)
    if filters.tenant:
        if not ID.fullmatch(filters.tenant):
            raise validation_error(["query", "tenant"], "must be a tenant id (ten_…)")
        query = query.where(Job.tenant_id == filters.tenant)
    since, until = _time_arg("since"), _time_arg("until")
    if since is not None:
        query = query.where(Job.created_at >= since)
    if until is not None:
        query = query.where(Job.created_at < until)
    limit, cursor = page_params()
    rows, next_cursor = paginate(query, Job, limit, cursor)
    from worker.jobs import job_types

    return render_template(
        "admin/jobs.html",
        jobs=rows,
        next_cursor=next_cursor,
        filters=filters,
        search=search,
        statuses=[s.value for s in JobStatus],
        types=sorted(job_types(config.settings())),
        tenants=_tenant_names({job.tenant_id for job in rows}),
        limit=limit,
    )


def _tenant_names(ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    return dict(g.db.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(ids))).all())


@dataclass
class ArtifactView:
    row: Artifact
    url: str | None  # None: retention deleted the object (``row.expired_at``)

    @property
    def is_image(self) -> bool:
        return self.row.content_type.startswith("image/")


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    if not ID.fullmatch(job_id):
        raise ApiError(404, f"No job {job_id!r}.")
    row = g.db.scalars(
        select(Job)
        .where(Job.id == job_id)
        .options(selectinload(Job.artifacts), selectinload(Job.events), selectinload(Job.retries))
        .execution_options(populate_existing=True)
    ).one_or_none()
    if row is None:
        raise ApiError(404, f"No job {job_id!r}.")
    storage = config.storage()
    artifacts = [
        ArtifactView(a, None if a.expired_at is not None else storage.presigned_url(a.storage_key))
        for a in row.artifacts
    ]
    # The segmentation overlay first: it is what an operator wants to see.
    artifacts.sort(key=lambda a: (not a.is_image, a.row.name != "overlay.png", a.row.name))
    deliveries = g.db.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.job_id == job_id)
        .options(selectinload(WebhookDelivery.history))
        .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
        .limit(100)
    ).all()
    return render_template(
        "admin/job.html",
        breakers=endpoints.shown(g.db, deliveries, config.settings()),
        job=row,
        tenant=g.db.get(Tenant, row.tenant_id),
        artifacts=artifacts,
        inputs=_input_files(row),
        attempts=[(attempt, list(events)) for attempt, events in groupby(row.events, key=lambda e: e.attempt)],
        deliveries=deliveries,
        progress={"step": 0, "total": None, "fraction": 0.0, "message": None, **(row.progress or {})},
        last_event_id=max((e.id for e in row.events), default=0),  # the page's stream starts after it
        queue_seconds=_seconds(row.created_at, row.started_at),
        run_seconds=_seconds(row.started_at, row.finished_at),
        can_cancel=row.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value),
        can_retry=row.status in (JobStatus.FAILED.value, JobStatus.CANCELED.value),
        output_json=json.dumps(_abridged(row.output), indent=2) if row.output is not None else None,
        input_json=json.dumps(_abridged(row.input), indent=2),
    )


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def _input_files(job: Job) -> list[tuple[File, str | None]]:
    """Uploaded files the job's input names, with a presigned URL for images (thumbnails)."""
    ids: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, str) and FILE_ID.fullmatch(value):
            ids.add(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    collect(job.input)
    if not ids:
        return []
    storage = config.storage()
    files = g.db.scalars(select(File).where(File.id.in_(ids), File.tenant_id == job.tenant_id).order_by(File.id))
    return [(f, storage.presigned_url(f.storage_key) if f.content_type.startswith("image/") else None) for f in files]


def _abridged(value: Any, depth: int = 0) -> Any:
    """The JSON with very long strings and lists shortened (RLE masks, loss curves), for reading."""
    if isinstance(value, str) and len(value) > 160:
        return f"{value[:120]}… ({len(value)} characters)"
    if isinstance(value, list):
        items = [_abridged(v, depth + 1) for v in value[:25]]
        if len(value) > 25:
            items.append(f"… {len(value) - 25} more")
        return items
    if isinstance(value, dict):
        return {k: _abridged(v, depth + 1) for k, v in value.items()}
    return value


# --- tenants and keys ----------------------------------------------------------------------------------------


@bp.get("/jobs/<job_id>/events")
def job_events(job_id: str) -> Response:
    """The job page's live progress: the job's event stream (``api.events``), under the admin's session and
    counted under the admin key's stream caps. ``static/admin.js`` reads it with an ``EventSource``."""
    if not ID.fullmatch(job_id) or g.db.scalar(select(Job.id).where(Job.id == job_id)) is None:
        raise ApiError(404, f"No job {job_id!r}.")
    admin = current_admin()
    return events.stream_response(job_id, None, admin.id, admin.tenant_id, events.last_event_id())


@bp.get("/tenants")
def tenants() -> str:
    period, seconds = _window("period", "24h")
    usage = stats.tenant_usage(g.db, utcnow() - timedelta(seconds=seconds))
    ids = [t.id for t in usage]
    return render_template(
        "admin/tenants.html",
        usage=usage,
        quotas=effective(g.db, ids, config.settings()),
        overridden=_overridden(ids),
        now_used=tenant_usage.usage(g.db, ids),
        period=period,
        windows=list(WINDOWS),
        gpu_queues=stats.GPU_QUEUES,
        total_gpu_seconds=sum(t.gpu_seconds for t in usage),
        total_jobs=sum(t.total_jobs for t in usage),
    )


def _overridden(ids: list[str]) -> dict[str, list[str]]:
    """Tenant → the names of the quotas an admin set for it."""
    rows = g.db.scalars(select(TenantQuota).where(TenantQuota.tenant_id.in_(ids))) if ids else []
    return {row.tenant_id: [name for name in QUOTA_FIELDS if getattr(row, name) is not None] for row in rows}


def tenant_page(tenant_id: str, errors: list[str] | None = None, form: dict[str, str] | None = None) -> str:
    """One tenant: its quotas (effective, overridden, default), what it uses now, and the form to change them."""
    tenant = g.db.get(Tenant, tenant_id) if ID.fullmatch(tenant_id) else None
    if tenant is None:
        raise ApiError(404, f"No tenant {tenant_id!r}.")
    shown = tenants_json(g.db, [tenant])[0]
    if form is None:
        form = {name: "" if value is None else str(value) for name, value in shown["overrides"].items()}
    return render_template(
        "admin/tenant.html",
        tenant=shown,
        defaults=asdict(quota_defaults(config.settings())),
        fields=QUOTA_FIELDS,
        errors=errors or [],
        form=form,
    )


@bp.get("/tenants/<tenant_id>")
def tenant(tenant_id: str) -> str:
    return tenant_page(tenant_id)


def keys_page(
    created: tuple[ApiKey, str] | None = None,
    errors: list[str] | None = None,
    form: Any = None,
    confirm_revoke: ApiKey | None = None,
) -> str:
    limit, cursor = page_params()
    query = select(ApiKey).options(selectinload(ApiKey.tenant))
    tenant = request.args.get("tenant", "").strip()
    if tenant:
        if not ID.fullmatch(tenant):
            raise validation_error(["query", "tenant"], "must be a tenant id (ten_…)")
        query = query.where(ApiKey.tenant_id == tenant)
    rows, next_cursor = paginate(query, ApiKey, limit, cursor)
    return render_template(
        "admin/keys.html",
        keys=rows,
        next_cursor=next_cursor,
        tenant=tenant,
        created=created,
        errors=errors or [],
        form=form or {},
        limit=limit,
        confirm_revoke=confirm_revoke,
    )


@bp.get("/keys")
def keys() -> str:
    return keys_page()
