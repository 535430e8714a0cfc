"""Sending a job's deliveries: claim one, sign it, check where it goes, POST it, record and schedule.

No database session is held during the HTTP request. The outcome of an attempt:

- any 2xx: delivered;
- 410 Gone, or a URL the SSRF guard refuses: failed, not retried;
- anything else (3xx included: redirects are not followed), a timeout, a connection or DNS
  failure: retried with exponential backoff and jitter until the retry horizon, the last try
  made at the horizon itself; 429 and 503 wait at least what ``Retry-After`` asks;
- a ``progress`` delivery that failed while a later event of its job exists gives up: the later
  event says more, and stale progress is not worth a day of retries.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import webhooks
from db.models import Artifact, DeliveryStatus, Job, WebhookDelivery, WebhookEvent, utcnow
from db.session import session_scope
from db.settings import Settings, get_settings
from db.wire import rfc3339, with_artifact_urls
from worker.webhooks import guard, signing
from worker.webhooks.sender import Answer, SendError, post

log = logging.getLogger(__name__)

# A retry due this soon is also enqueued with a countdown (faster than waiting for the sweep);
# later ones are left to the sweep, so no message waits for hours in a worker's memory.
COUNTDOWN_LIMIT_SECONDS = 60.0
# A task sends at most this many deliveries of one job in a row before leaving the rest to the sweep.
MAX_PER_TASK = 50


@dataclass(frozen=True)
class Attempt:
    """What one attempt found, before it is judged."""

    at: datetime
    duration_seconds: float
    answer: Answer | None = None
    error: str | None = None
    refused: bool = False


def send_due(job_id: str) -> list[str]:
    """Send the job's due deliveries one after another; returns each one's outcome (for logs and tests)."""
    settings = get_settings()
    lease_seconds = settings.webhook_timeout_seconds + 30
    outcomes: list[str] = []
    for _ in range(MAX_PER_TASK):
        with session_scope() as session:
            delivery = webhooks.claim_next(session, job_id, lease_seconds)
            if delivery is None:
                break
            job = session.get(Job, job_id)
            assert job is not None and job.webhook
            url = job.webhook
            secrets = webhooks.signing_secrets(session, job.tenant_id)
            body = render(session, delivery, job)
        attempt = _attempt(url, delivery.id, secrets, body, settings)
        outcome, next_attempt_at, error = judge(delivery, attempt, settings)
        if outcome == DeliveryStatus.PENDING and delivery.event == WebhookEvent.PROGRESS.value:
            with session_scope() as session:
                if webhooks.superseded(session, delivery):
                    outcome, next_attempt_at = DeliveryStatus.GAVE_UP, None
                    error = f"{error}; not retried: the job has a later event"
        with session_scope() as session:
            recorded = webhooks.record_attempt(
                session,
                delivery,
                number=delivery.attempts + 1,
                at=attempt.at,
                duration_seconds=attempt.duration_seconds,
                status_code=attempt.answer.status if attempt.answer else None,
                response_excerpt=attempt.answer.excerpt if attempt.answer else None,
                error=error,
                outcome=outcome,
                next_attempt_at=next_attempt_at,
            )
        if not recorded:
            log.warning("delivery %s: attempt %d was recorded by another sender", delivery.id, delivery.attempts + 1)
            continue
        log.info(
            "webhook %s (job %s, %s) attempt %d: %s%s",
            delivery.id,
            job_id,
            delivery.event,
            delivery.attempts + 1,
            outcome.value,
            f" ({error})" if error else "",
        )
        outcomes.append(outcome.value)
        if next_attempt_at is not None:
            _enqueue_soon(job_id, next_attempt_at)
    return outcomes


def sweep(limit: int = 500) -> list[str]:
    """On beat: enqueue the sending of every job that has a delivery due (first tries the broker lost, retries)."""
    from worker.celery_app import send_webhooks

    with session_scope() as session:
        job_ids = webhooks.due_jobs(session, limit)
    # A backlog makes the next sweeps find the same jobs again: their older messages expire unrun.
    expires = max(get_settings().webhook_sweep_seconds * 2, 5)
    for job_id in job_ids:
        send_webhooks(job_id, expires=expires)
    return job_ids


def render(session: Session, delivery: WebhookDelivery, job: Job) -> bytes:
    """``{"type": "job.<event>", "timestamp", "data": Job}``: the job as it was at the event, with fresh URLs."""
    data = dict(delivery.payload)
    if data.get("status") == "succeeded" and data.get("output") is not None:
        rows = session.execute(select(Artifact.name, Artifact.storage_key).where(Artifact.job_id == job.id)).all()
        data["output"] = with_artifact_urls(data["output"], {name: key for name, key in rows})
    envelope = {"type": f"job.{delivery.event}", "timestamp": rfc3339(delivery.created_at), "data": data}
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


def _attempt(url: str, webhook_id: str, secrets: list[str], body: bytes, settings: Settings) -> Attempt:
    at = utcnow()
    started = time.monotonic()

    def took() -> float:
        return time.monotonic() - started

    try:
        target = guard.check_url(url, settings.webhook_allow_private)
        addresses = guard.resolve(target, settings.webhook_allow_private)
    except guard.Refused as exc:
        return Attempt(at, took(), error=f"refused: the webhook URL {exc}", refused=True)
    except guard.Unresolvable as exc:
        return Attempt(at, took(), error=str(exc))
    headers = signing.headers(secrets, webhook_id, int(time.time()), body)
    try:
        answer = post(target, addresses, body, headers, settings.webhook_timeout_seconds)
    except SendError as exc:
        return Attempt(at, took(), error=str(exc))
    return Attempt(at, took(), answer=answer)


def judge(
    delivery: WebhookDelivery, attempt: Attempt, settings: Settings, now: datetime | None = None
) -> tuple[DeliveryStatus, datetime | None, str | None]:
    """The delivery's status after this attempt (made just before ``now``), when to try next, and the error to show."""
    answer = attempt.answer
    if attempt.refused:
        return DeliveryStatus.FAILED, None, attempt.error
    if answer is not None and 200 <= answer.status < 300:
        return DeliveryStatus.DELIVERED, None, None
    if answer is not None and answer.status == 410:
        return DeliveryStatus.FAILED, None, "the receiver answered 410 Gone: not retried"
    if answer is None:
        error = attempt.error or "no answer"
    elif 300 <= answer.status < 400:
        where = f" to {answer.location}" if answer.location else ""
        error = f"the receiver answered {answer.status} (a redirect{where}); redirects are not followed"
    else:
        error = f"the receiver answered {answer.status}"

    now = now or utcnow()
    horizon = delivery.series_started_at + timedelta(seconds=settings.webhook_retry_horizon_seconds)
    if now >= horizon:
        return (
            DeliveryStatus.GAVE_UP,
            None,
            f"{error}; gave up after retrying for {_span(settings.webhook_retry_horizon_seconds)}",
        )
    number_in_series = delivery.attempts + 1 - delivery.series_first_attempt + 1
    delay = retry_delay(number_in_series, settings)
    if answer is not None and answer.status in (429, 503) and answer.retry_after is not None:
        # Never sooner than the receiver asked, never later than the longest backoff.
        delay = min(max(answer.retry_after, delay), settings.webhook_retry_max_delay_seconds)
    return DeliveryStatus.PENDING, min(now + timedelta(seconds=delay), horizon), error


def retry_delay(failed_attempts: int, settings: Settings) -> float:
    """Wait after the n-th failed attempt of a series: base·2ⁿ⁻¹, capped, times a jitter in [0.75, 1].

    Jitter spreads the retries of many deliveries that failed together (a receiver's outage);
    its range is narrow enough that each wait is still longer than the one before (until the cap).
    """
    exponent = min(max(failed_attempts - 1, 0), 40)
    delay = min(settings.webhook_retry_base_seconds * 2**exponent, settings.webhook_retry_max_delay_seconds)
    return float(delay * random.uniform(0.75, 1.0))


def _span(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _enqueue_soon(job_id: str, next_attempt_at: datetime) -> None:
    delay = (next_attempt_at - utcnow()).total_seconds()
    if delay > COUNTDOWN_LIMIT_SECONDS:
        return
    from worker.celery_app import send_webhooks

    try:
        send_webhooks(job_id, countdown=max(delay, 0.0))
    except Exception as exc:  # the sweep sends it when it is due
        log.warning("could not enqueue the retry of %s's webhooks: %s", job_id, exc)
