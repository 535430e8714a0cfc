"""Sending deliveries: claim one fairly, sign it, check where it goes, POST it, record and schedule.

``claim`` takes the next due delivery of the endpoint served longest ago (``db/endpoints.py``:
fair turns, a concurrency limit per endpoint, the circuit breaker); ``send`` makes its attempt on
one of the process's sender threads (``pump.py``). No database session is held during the HTTP
request. The outcome of an attempt:

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
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import endpoints, tracing, webhooks
from db.models import Artifact, DeliveryStatus, Job, WebhookDelivery, WebhookEvent, utcnow
from db.session import session_scope
from db.settings import Settings, get_settings
from db.wire import artifact_keys, outputs_expired_at, rfc3339, with_artifact_urls
from worker import metrics
from worker.webhooks import guard, signing
from worker.webhooks.sender import Answer, SendError, post

log = logging.getLogger(__name__)

# A retry due this soon is also enqueued with a countdown (faster than waiting for the sweep);
# later ones are left to the sweep, so no message waits for hours in a worker's memory.
COUNTDOWN_LIMIT_SECONDS = 60.0


@dataclass(frozen=True)
class Attempt:
    """What one attempt found, before it is judged."""

    at: datetime
    duration_seconds: float
    answer: Answer | None = None
    error: str | None = None
    refused: bool = False


@dataclass(frozen=True)
class Claimed:
    """A delivery taken for one attempt, with all the attempt needs (read in the claim's transaction)."""

    delivery: WebhookDelivery
    url: str
    secrets: list[str]
    body: bytes
    traceparent: str | None = None  # the job's (db.tracing): the delivery's span joins the job's trace


def claim(settings: Settings) -> Claimed | None:
    """Take the next due delivery, fairly between endpoints (``db.endpoints.claim``), and render it."""
    with session_scope() as session:
        delivery = endpoints.claim(session, settings, lease_seconds(settings))
        if delivery is None:
            return None
        job = session.get(Job, delivery.job_id)
        assert job is not None and job.webhook
        return Claimed(
            delivery,
            job.webhook,
            webhooks.signing_secrets(session, job.tenant_id),
            render(session, delivery, job),
            job.traceparent,
        )


def lease_seconds(settings: Settings) -> float:
    """How long a claim holds its delivery (and its endpoint's slot): the attempt's timeout and a margin."""
    return settings.webhook_timeout_seconds + 30


def send(claimed: Claimed, settings: Settings) -> str:
    """Make one attempt of a claimed delivery, record it and what the endpoint's breaker makes of it."""
    delivery = claimed.delivery
    where: dict[str, Any] = {"job_id": delivery.job_id, "delivery": delivery.id, "event": delivery.event}
    with tracing.span("webhook.deliver", claimed.traceparent, **where):
        attempt = _attempt(claimed.url, delivery.id, claimed.secrets, claimed.body, settings)
    outcome, next_attempt_at, error = judge(delivery, attempt, settings)
    if outcome == DeliveryStatus.PENDING and delivery.event == WebhookEvent.PROGRESS.value:
        with session_scope() as session:
            if webhooks.superseded(session, delivery):
                outcome, next_attempt_at = DeliveryStatus.GAVE_UP, None
                error = f"{error}; not retried: the job has a later event"
    opened = None
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
        failed = endpoint_failure(attempt)
        if recorded and failed is not None and delivery.endpoint_id is not None:
            opened = endpoints.record_outcome(session, delivery.endpoint_id, failed, error, settings)
    if not recorded:
        log.warning("delivery %s: attempt %d was recorded by another sender", delivery.id, delivery.attempts + 1)
        return "superseded"
    metrics.webhook_attempt(attempt.answer.status if attempt.answer else None)
    log.info(
        "webhook %s (job %s, %s) attempt %d: %s%s",
        delivery.id,
        delivery.job_id,
        delivery.event,
        delivery.attempts + 1,
        outcome.value,
        f" ({error})" if error else "",
    )
    if opened is not None and opened.open_until is not None:
        log.warning(
            "webhook endpoint %s: circuit breaker open until %s after %d failures in a row",
            delivery.endpoint_id,
            opened.open_until.isoformat(),
            opened.consecutive_failures,
        )
        _enqueue_soon(delivery.job_id, opened.open_until)  # the half-open probe, on time
    elif next_attempt_at is not None:
        _enqueue_soon(delivery.job_id, next_attempt_at)
    return outcome.value


def endpoint_failure(attempt: Attempt) -> bool | None:
    """What the attempt says of the endpoint's health: failed (no answer, 5xx, 429), fine, or nothing (refused)."""
    if attempt.refused:
        return None
    if attempt.answer is None:
        return True
    return attempt.answer.status >= 500 or attempt.answer.status == 429


def sweep(limit: int = 100) -> list[str]:
    """On beat: wake senders for every endpoint with a delivery due (first tries the broker lost, retries, probes).

    This worker's senders start at once; one wake-up message per such endpoint lets other webhooks
    workers help."""
    from worker.celery_app import send_webhooks
    from worker.webhooks.pump import PUMP

    with session_scope() as session:
        due = endpoints.due_endpoints(session, limit)
    if not due:
        return due
    PUMP.kick()
    # A backlog makes the next sweeps find the same endpoints again: their older messages expire unrun.
    expires = max(get_settings().webhook_sweep_seconds * 2, 5)
    for endpoint in due:
        send_webhooks(endpoint, expires=expires)
    return due


def render(session: Session, delivery: WebhookDelivery, job: Job) -> bytes:
    """``{"type": "job.<event>", "timestamp", "data": Job}``: the job as it was at the event, with fresh URLs."""
    data = dict(delivery.payload)
    if data.get("status") == "succeeded" and data.get("output") is not None:
        # Expired since the event? Then the body says so (``url`` null, ``outputs_expired_at``), signing nothing.
        rows = session.execute(
            select(Artifact.name, Artifact.storage_key, Artifact.expired_at).where(Artifact.job_id == job.id)
        ).all()
        data["output"] = with_artifact_urls(data["output"], artifact_keys(rows))
        data["outputs_expired_at"] = rfc3339(outputs_expired_at(rows))
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
    """A wake-up for the senders when the retry is due (any due delivery goes then, fairly)."""
    delay = (next_attempt_at - utcnow()).total_seconds()
    if delay > COUNTDOWN_LIMIT_SECONDS:
        return
    from worker.celery_app import send_webhooks

    try:
        send_webhooks(job_id, countdown=max(delay, 0.0))
    except Exception as exc:  # the sweep sends it when it is due
        log.warning("could not enqueue the retry of %s's webhooks: %s", job_id, exc)
