"""What an operator can do from the dashboard: every action is a POST carrying the session's CSRF token.

The state changes go through the same code as the API: ``transitions.request_cancel`` and
``transitions.retry`` for jobs, ``webhooks.redeliver`` for deliveries, ``db.keys`` for keys,
``api.tenants`` for a tenant's quota overrides.
After an action the browser is sent back (303) to the page it came from, with a message.
"""

from __future__ import annotations

import logging

from flask import flash, g, redirect, request, url_for
from pydantic import ValidationError
from sqlalchemy import select
from werkzeug.wrappers import Response as BaseResponse

from api import config
from api.admin.blueprint import bp
from api.admin.pages import keys_page, tenant_page
from api.admin.session import current_admin
from api.errors import ApiError
from api.jobs import request_cancel
from api.keys import KeyCreate
from api.presenters import ID
from api.tenants import parse_update, set_overrides
from db import keys as key_store
from db import transitions, webhooks
from db.models import ApiKey, Job, JobStatus, Tenant, WebhookDelivery
from db.quotas import FIELDS as QUOTA_FIELDS

log = logging.getLogger(__name__)


def _job(job_id: str) -> Job:
    job: Job | None = g.db.get(Job, job_id) if ID.fullmatch(job_id) else None
    if job is None:
        raise ApiError(404, f"No job {job_id!r}.")
    return job


def _operator() -> str:
    key = current_admin()
    return f"admin key {key.id} ({key.name})"


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> BaseResponse:
    _job(job_id)
    status = request_cancel(job_id)
    log.info("%s canceled job %s (now %s)", _operator(), job_id, status.value)
    if status == JobStatus.CANCELED:
        flash("Canceled: the job will not run.", "info")
    else:
        flash("Cancel requested: the job stops at its next step.", "info")
    return redirect(url_for("admin.job", job_id=job_id), 303)


@bp.post("/jobs/<job_id>/retry")
def retry_job(job_id: str) -> BaseResponse:
    from worker.dispatcher import dispatch_soon

    job = _job(job_id)
    settings = config.settings()
    if not transitions.retry(g.db, job_id, settings.max_attempts, _operator()):
        g.db.rollback()
        raise ApiError(409, f"Only a failed or canceled job can be retried; this one is {job.status}.")
    # Commit, then let the scheduler send it when its queue has a free slot (else the job waits its turn).
    g.db.commit()
    log.info("%s retried job %s", _operator(), job_id)
    dispatch_soon(job.queue, settings, submitted=job_id)
    flash(f"Retried: the job is queued again for attempt {job.attempts + 1}.", "info")
    return redirect(url_for("admin.job", job_id=job_id), 303)


@bp.post("/jobs/<job_id>/webhooks/<delivery_id>/redeliver")
def redeliver_webhook(job_id: str, delivery_id: str) -> BaseResponse:
    _job(job_id)
    found = (
        ID.fullmatch(delivery_id)
        and g.db.execute(
            select(WebhookDelivery.id).where(WebhookDelivery.id == delivery_id, WebhookDelivery.job_id == job_id)
        ).first()
    )
    if not found:
        raise ApiError(404, f"No webhook delivery {delivery_id!r} for job {job_id!r}.")
    webhooks.redeliver(g.db, delivery_id)
    g.db.commit()  # the commit hook asks a webhooks worker to send it now
    log.info("%s redelivered webhook %s of job %s", _operator(), delivery_id, job_id)
    flash(f"Redelivery of {delivery_id} queued.", "info")
    return redirect(url_for("admin.job", job_id=job_id, _anchor="webhooks"), 303)


@bp.post("/keys")
def create_key() -> str | tuple[str, int]:
    form = {
        "name": request.form.get("name", "").strip(),
        "role": request.form.get("role", "user"),
        "tenant": request.form.get("tenant", "").strip() or None,
    }
    try:
        spec = KeyCreate.model_validate(form)
    except ValidationError as exc:
        errors = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return keys_page(errors=errors, form=form), 422
    if spec.tenant is not None and g.db.get(Tenant, spec.tenant) is None:
        return keys_page(errors=[f"tenant: no tenant {spec.tenant!r}"], form=form), 422
    key, plaintext = key_store.create_key(g.db, spec.name, spec.role, spec.tenant)
    g.db.commit()
    log.info("%s created %s key %s (%s)", _operator(), key.role, key.id, key.name)
    # Shown in this answer only: never in a redirect, a flash message or the (signed, readable) cookie.
    return keys_page(created=(key, plaintext)), 201


@bp.post("/keys/<key_id>/revoke")
def revoke_key(key_id: str) -> BaseResponse | tuple[str, int]:
    key = g.db.get(ApiKey, key_id) if ID.fullmatch(key_id) else None
    if key is None:
        raise ApiError(404, f"No key {key_id!r}.")
    # The API's rule: this session's key, or the last active admin key, only when forced.
    forced = request.form.get("force", "") in ("true", "1", "yes")
    refusal = None if forced else key_store.revocation_refusal(g.db, key, current_admin().id)
    if refusal is not None:
        g.db.rollback()
        return keys_page(errors=[f"{refusal} Not revoked."], confirm_revoke=key), 409
    key_store.revoke(g.db, key)
    g.db.commit()
    log.info("%s revoked key %s (%s)", _operator(), key.id, key.name)
    if key.id == current_admin().id:
        flash("You revoked the key of this session: it ends now.", "info")
    else:
        flash(f"Revoked {key.name} ({key.id}): it is refused from now on.", "info")
    return redirect(url_for("admin.keys"), 303)


@bp.post("/tenants/<tenant_id>/quotas")
def set_quotas(tenant_id: str) -> BaseResponse | tuple[str, int]:
    """The tenant page's form: every field at once; an empty one clears its override."""
    tenant = g.db.get(Tenant, tenant_id) if ID.fullmatch(tenant_id) else None
    if tenant is None:
        raise ApiError(404, f"No tenant {tenant_id!r}.")
    form = {name: request.form.get(name, "").strip() for name in QUOTA_FIELDS}
    body: dict[str, object] = {}
    errors = []
    for name, raw in form.items():
        try:
            body[name] = None if raw == "" else float(raw) if name == "weight" else int(raw)
        except ValueError:
            errors.append(f"{name}: must be {'a number' if name == 'weight' else 'a whole number'} (or empty)")
    if not errors:
        try:
            changes = parse_update(body, prefix=[])
        except ApiError as exc:
            errors = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors or []] or [exc.detail]
    if errors:
        g.db.rollback()
        return tenant_page(tenant.id, errors=errors, form=form), 422
    set_overrides(g.db, tenant.id, changes)
    log.info("%s set the quotas of tenant %s: %s", _operator(), tenant.id, changes)
    flash(f"Saved the quotas of {tenant.name}.", "info")
    return redirect(url_for("admin.tenant", tenant_id=tenant.id), 303)
