"""Webhook state: each tenant's signing secret, and one delivery row per job event.

A delivery is written by the state machine in the same transaction as the event it announces
(``completed`` with the terminal transition, ``start`` with the first claim), so a crash can
neither lose it nor make a second one. The webhook worker sends it; what it is due for next
(``next_attempt_at``) lives here too, so retries survive restarts and the beat sweep finds them.

After a commit that wrote deliveries, the callback given to ``install`` is called
with each job id (the Celery app registers one that enqueues the sending task): best effort,
the sweep is the safety net.
"""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event, exists, func, insert, select, update
from sqlalchemy.orm import Session

from db import endpoints
from db.models import DeliveryStatus, Job, WebhookAttempt, WebhookDelivery, WebhookEvent, WebhookSecret, utcnow
from db.wire import job_json

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
_PENDING_JOBS = "gpujobs.webhook_jobs"  # session.info key: jobs that got deliveries in this transaction
_announcer: list[Callable[[str], None]] = []  # the one callback ``install`` set, if any


# --- secrets ------------------------------------------------------------------------------------


def new_secret() -> str:
    """``whsec_`` and the base64 of 32 random bytes (the HMAC key is the decoded part)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def tenant_secret(session: Session, tenant_id: str) -> WebhookSecret:
    """The tenant's secret, created the first time anyone needs it (concurrent first uses agree)."""
    row = session.get(WebhookSecret, tenant_id)
    if row is None:
        _insert_if_absent(session, WebhookSecret, tenant_id=tenant_id, secret=new_secret(), created_at=utcnow())
        row = session.get(WebhookSecret, tenant_id, populate_existing=True)
        assert row is not None
    return row


def rotate_secret(session: Session, tenant_id: str, grace_seconds: float) -> WebhookSecret:
    """Make a new secret; the one it replaces keeps signing (beside it) for ``grace_seconds``."""
    current = tenant_secret(session, tenant_id)
    now = utcnow()
    session.execute(
        update(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.secret == current.secret)
        .values(
            secret=new_secret(),
            previous_secret=current.secret,
            previous_valid_until=now + timedelta(seconds=grace_seconds),
            rotated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    # A rotation that raced ours and won is just as new: either way, read what is there now.
    row = session.get(WebhookSecret, tenant_id, populate_existing=True)
    assert row is not None
    return row


def signing_secrets(session: Session, tenant_id: str) -> list[str]:
    """The secrets that sign a delivery now: the current one, and the previous one during its grace period."""
    row = tenant_secret(session, tenant_id)
    found = [row.secret]
    if row.previous_secret and row.previous_valid_until and row.previous_valid_until > utcnow():
        found.append(row.previous_secret)
    return found


# --- recording events ---------------------------------------------------------------------------


def job_event(
    session: Session, job_id: str, kind: WebhookEvent, target: tuple[str | None, list[str] | None] | None = None
) -> str | None:
    """Record a ``start`` or ``completed`` delivery if the job has a webhook that wants this event.

    Called by the state machine inside the transition's transaction; returns the delivery id. ``target`` is
    the job's ``(webhook, webhook_events_filter)`` when the transition's UPDATE returned them (no read here).
    """
    if target is None:
        target = session.execute(select(Job.webhook, Job.webhook_events_filter).where(Job.id == job_id)).first()
    if target is None:
        return None
    webhook, events = target
    if not webhook or kind.value not in (events or []):
        return None
    sequence = 0
    if kind == WebhookEvent.COMPLETED:  # a job an operator retried completes again: a new event (0, 1, …)
        last = session.execute(
            select(func.max(WebhookDelivery.sequence)).where(
                WebhookDelivery.job_id == job_id, WebhookDelivery.event == kind.value
            )
        ).scalar_one()
        sequence = 0 if last is None else last + 1
    return _record(session, job_id, kind, sequence)


def progress_event(session: Session, job_id: str) -> str | None:
    """Record a ``progress`` delivery (the caller throttles; the job is known to want progress events)."""
    last = session.execute(
        select(func.max(WebhookDelivery.sequence)).where(
            WebhookDelivery.job_id == job_id, WebhookDelivery.event == WebhookEvent.PROGRESS.value
        )
    ).scalar_one()
    return _record(session, job_id, WebhookEvent.PROGRESS, (last or 0) + 1)


def _record(session: Session, job_id: str, kind: WebhookEvent, sequence: int) -> str:
    # The transitions update with synchronize_session=False, so read the row as it is now.
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None and job.webhook
    endpoint = endpoints.ensure(session, job.tenant_id, job.webhook)
    now = utcnow()
    delivery = WebhookDelivery(
        job_id=job_id,
        event=kind.value,
        sequence=sequence,
        payload=job_json(job, urls=False),
        status=DeliveryStatus.PENDING.value,
        attempts=0,
        series_started_at=now,
        series_first_attempt=1,
        next_attempt_at=now,
        created_at=now,
        endpoint_id=endpoint,
    )
    session.add(delivery)
    session.flush()
    session.info.setdefault(_PENDING_JOBS, set()).add(job_id)
    return delivery.id


def install(callback: Callable[[str], None]) -> None:
    """Call ``callback(job_id)`` after each commit (in this process) that recorded deliveries for that job.

    Replaces the callback an earlier call set (``worker.hooks.install_hooks``)."""
    _announcer[:] = [callback]
    if not event.contains(Session, "after_commit", _announce):
        event.listen(Session, "after_commit", _announce)
        event.listen(Session, "after_rollback", _forget)


def _announce(session: Session) -> None:
    job_ids = session.info.pop(_PENDING_JOBS, None)
    if not job_ids:
        return
    for job_id in sorted(job_ids):
        for callback in _announcer:
            try:
                callback(job_id)
            except Exception as exc:  # the broker may be down: the sweep sends the delivery later
                log.warning("could not enqueue the webhooks of %s (the sweep will send them): %s", job_id, exc)


def _forget(session: Session) -> None:
    session.info.pop(_PENDING_JOBS, None)


# --- sending (``db/endpoints.py`` claims the next delivery fairly) ---------------------------------


def superseded(session: Session, delivery: WebhookDelivery) -> bool:
    """A later event of the same job exists (a stale ``progress`` is not worth retrying)."""
    return session.execute(
        select(
            exists().where(WebhookDelivery.job_id == delivery.job_id, WebhookDelivery.created_at > delivery.created_at)
        )
    ).scalar_one()


def record_attempt(
    session: Session,
    delivery: WebhookDelivery,
    *,
    number: int,
    at: datetime,
    duration_seconds: float,
    status_code: int | None,
    response_excerpt: str | None,
    error: str | None,
    outcome: DeliveryStatus,
    next_attempt_at: datetime | None,
) -> bool:
    """Save one attempt and what the delivery does next; ``False`` if another sender recorded it first."""
    values: dict[str, Any] = {
        "attempts": number,
        "status": outcome.value,
        "next_attempt_at": next_attempt_at,
        "last_error": error,
        "claimed_until": None,  # the endpoint's slot is free again
    }
    if outcome == DeliveryStatus.DELIVERED:
        values["delivered_at"] = at + timedelta(seconds=duration_seconds)
    done = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery.id,
            WebhookDelivery.status == DeliveryStatus.PENDING.value,
            WebhookDelivery.attempts == number - 1,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.execute(
        insert(WebhookAttempt).values(
            delivery_id=delivery.id,
            number=number,
            at=at,
            status_code=status_code,
            response_excerpt=response_excerpt,
            error=error,
            duration_seconds=round(duration_seconds, 4),
        )
    )
    return True


def redeliver(session: Session, delivery_id: str) -> bool:
    """Send a delivery again now, as a new series of attempts (same ``webhook-id``, a fresh retry horizon)."""
    now = utcnow()
    done = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(
            status=DeliveryStatus.PENDING.value,
            next_attempt_at=now,
            series_started_at=now,
            series_first_attempt=WebhookDelivery.attempts + 1,
        )
        .returning(WebhookDelivery.job_id, WebhookDelivery.endpoint_id)
        .execution_options(synchronize_session=False)
    ).first()
    if done is None:
        return False
    job = session.get(Job, done[0])
    if done[1] is None and job is not None and job.webhook:  # delivered before endpoints existed (migration 0006)
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(endpoint_id=endpoints.ensure(session, job.tenant_id, job.webhook))
            .execution_options(synchronize_session=False)
        )
    session.info.setdefault(_PENDING_JOBS, set()).add(done[0])
    return True


def _insert_if_absent(session: Session, model: Any, **values: Any) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        session.execute(postgresql.insert(model).values(**values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        session.execute(sqlite.insert(model).values(**values).on_conflict_do_nothing())
    else:  # pragma: no cover - the two supported databases are above
        session.execute(insert(model).values(**values))
