"""Webhook endpoints: fair turns, a concurrency limit and a circuit breaker per (tenant, origin).

An endpoint is one tenant's ``scheme://host:port``. The origin, not the whole URL, because a
receiver's capacity and its outages belong to the server, whatever the path; per tenant, because
two tenants may use one shared receiver (a webhook relay) and one tenant's broken hook there must
not slow down or open the breaker for the other.

- **Fair turns.** ``claim`` looks at the endpoints that have a due delivery, the one served
  longest ago first (``last_turn_at``): round robin over (tenant, origin), not FIFO over events.
- **Concurrency.** An attempt holds its delivery's ``claimed_until``; an endpoint with
  ``webhook_endpoint_concurrency`` unexpired claims is skipped (its deliveries wait, due, for a
  free slot). A sender that dies frees its slot when its claim runs out.
- **Breaker.** ``webhook_breaker_failures`` failures in a row (no answer, 5xx, 429) open the
  endpoint for ``webhook_breaker_open_seconds``, doubled at each trip since it last closed (up to
  ``webhook_breaker_max_open_seconds``). While open its deliveries are deferred: not attempted,
  so no attempt and no backoff step is spent on them (their retry horizon still runs: time is
  time, and every delivery gets its attempts once the endpoint is back). Then it is half-open: one
  probe at a time; a success closes it, a failure opens it again for longer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import case, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from db.models import BreakerState, DeliveryStatus, WebhookDelivery, WebhookEndpoint, utcnow
from db.settings import Settings

DEFAULT_PORTS = {"http": 80, "https": 443}
# How many endpoints with due deliveries one claim looks at (the least recently served first).
CANDIDATES = 32


def origin(url: str) -> str:
    """``scheme://host:port`` of a webhook URL, lower-case, with the default port spelled out (no credentials)."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme, 0)
    except ValueError:  # a port out of range: the guard refuses the URL at send; it still needs an endpoint
        port = 0
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def endpoint_id(tenant_id: str, url: str) -> str:
    """The endpoint's id: derived from the tenant and the origin, so writers agree without a lookup."""
    digest = hashlib.sha256(f"{tenant_id}\n{origin(url)}".encode()).hexdigest()
    return f"whe_{digest[:32]}"


def ensure(session: Session, tenant_id: str, url: str) -> str:
    """The endpoint of ``url`` for this tenant, created if it is new (concurrent first uses agree)."""
    from db.webhooks import _insert_if_absent

    key = endpoint_id(tenant_id, url)
    if session.get(WebhookEndpoint, key) is None:
        now = utcnow()
        _insert_if_absent(
            session,
            WebhookEndpoint,
            id=key,
            tenant_id=tenant_id,
            origin=origin(url),
            state=BreakerState.CLOSED.value,
            consecutive_failures=0,
            trips=0,
            changed_at=now,
            created_at=now,
        )
    return key


# --- claiming -------------------------------------------------------------------------------------


def claim(session: Session, settings: Settings, lease_seconds: float) -> WebhookDelivery | None:
    """Take the next due delivery for one attempt, fairly between endpoints; ``None`` if none may go now.

    The claim sets ``claimed_until`` (the slot) and moves ``next_attempt_at`` past the attempt's
    end (so neither another sender nor a duplicate task takes it meanwhile). An endpoint whose
    breaker is open until later, or whose slots are all taken, is skipped: its deliveries are
    deferred, not failed.
    """
    now = utcnow()
    due = select(WebhookDelivery.endpoint_id).where(
        WebhookDelivery.status == DeliveryStatus.PENDING.value,
        WebhookDelivery.next_attempt_at <= now,
        WebhookDelivery.endpoint_id.is_not(None),
    )
    busy = (
        select(func.count())
        .where(WebhookDelivery.endpoint_id == WebhookEndpoint.id, WebhookDelivery.claimed_until > now)
        .correlate(WebhookEndpoint)
        .scalar_subquery()
    )
    slots = case((WebhookEndpoint.state == BreakerState.CLOSED.value, settings.webhook_endpoint_concurrency), else_=1)
    candidates = session.scalars(
        select(WebhookEndpoint.id)
        .where(
            WebhookEndpoint.id.in_(due),
            or_(WebhookEndpoint.open_until.is_(None), WebhookEndpoint.open_until <= now),
            busy < slots,  # saturated endpoints wait their turn without hiding the others
        )
        .order_by(WebhookEndpoint.last_turn_at.asc().nulls_first(), WebhookEndpoint.id)
        .limit(CANDIDATES)
    ).all()
    for candidate in candidates:
        endpoint = session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.id == candidate)
            .with_for_update(skip_locked=True)  # another sender is taking a turn here: try the next endpoint
            .execution_options(populate_existing=True)
        ).first()
        if endpoint is None or (endpoint.open_until is not None and endpoint.open_until > now):
            continue
        probing = endpoint.state != BreakerState.CLOSED.value
        limit = 1 if probing else settings.webhook_endpoint_concurrency
        if in_flight(session, endpoint.id, now) >= limit:
            continue
        delivery = _take(session, endpoint.id, now, lease_seconds)
        if delivery is None:
            continue
        values: dict[str, object] = {"last_turn_at": now}
        if endpoint.state == BreakerState.OPEN.value:
            values.update(state=BreakerState.HALF_OPEN.value, changed_at=now)
        session.execute(
            update(WebhookEndpoint)
            .where(WebhookEndpoint.id == endpoint.id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return delivery
    return None


def in_flight(session: Session, endpoint: str, now: datetime | None = None) -> int:
    """Attempts to the endpoint that hold an unexpired claim."""
    return session.execute(
        select(func.count()).where(
            WebhookDelivery.endpoint_id == endpoint, WebhookDelivery.claimed_until > (now or utcnow())
        )
    ).scalar_one()


def _take(session: Session, endpoint: str, now: datetime, lease_seconds: float) -> WebhookDelivery | None:
    """Claim the endpoint's oldest due delivery; one waits while an earlier one of its job was never tried."""
    earlier = aliased(WebhookDelivery)
    blocked = exists().where(
        earlier.job_id == WebhookDelivery.job_id,
        earlier.status == DeliveryStatus.PENDING.value,
        earlier.attempts == 0,
        earlier.created_at < WebhookDelivery.created_at,
    )
    for _ in range(3):  # another sender may take the one we picked; look again
        candidate = session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.endpoint_id == endpoint,
                WebhookDelivery.status == DeliveryStatus.PENDING.value,
                WebhookDelivery.next_attempt_at <= now,
                ~blocked,
            )
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.created_at, WebhookDelivery.sequence)
            .limit(1)
        ).first()
        if candidate is None:
            return None
        lease = now + timedelta(seconds=lease_seconds)
        claimed = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == candidate.id,
                WebhookDelivery.status == DeliveryStatus.PENDING.value,
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(next_attempt_at=lease, claimed_until=lease)
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount == 1:  # type: ignore[attr-defined]
            session.refresh(candidate)
            return candidate
    return None


def due_endpoints(session: Session, limit: int) -> list[str]:
    """Endpoints with a delivery due and a breaker that lets it go (the sweep wakes senders for them)."""
    now = utcnow()
    due = select(WebhookDelivery.endpoint_id).where(
        WebhookDelivery.status == DeliveryStatus.PENDING.value, WebhookDelivery.next_attempt_at <= now
    )
    return list(
        session.scalars(
            select(WebhookEndpoint.id)
            .where(
                WebhookEndpoint.id.in_(due),
                or_(WebhookEndpoint.open_until.is_(None), WebhookEndpoint.open_until <= now),
            )
            .limit(limit)
        )
    )


# --- the breaker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Breaker:
    state: BreakerState
    consecutive_failures: int
    trips: int
    open_until: datetime | None


def after_attempt(before: Breaker, failed: bool, settings: Settings, now: datetime) -> Breaker:
    """The breaker after one attempt's outcome (``failed``: no answer, 5xx or 429)."""
    if not failed:
        return Breaker(BreakerState.CLOSED, 0, 0, None)
    failures = before.consecutive_failures + 1
    if before.state == BreakerState.OPEN:  # an attempt that was in flight when it opened: counted, nothing more
        return Breaker(BreakerState.OPEN, failures, before.trips, before.open_until)
    if before.state == BreakerState.HALF_OPEN or failures >= settings.webhook_breaker_failures:
        trips = before.trips + 1
        wait = min(
            settings.webhook_breaker_open_seconds * 2 ** min(trips - 1, 40), settings.webhook_breaker_max_open_seconds
        )
        return Breaker(BreakerState.OPEN, failures, trips, now + timedelta(seconds=wait))
    return Breaker(BreakerState.CLOSED, failures, before.trips, None)


def record_outcome(
    session: Session, endpoint: str, failed: bool, error: str | None, settings: Settings
) -> Breaker | None:
    """Apply one attempt's outcome to the endpoint's breaker (in the attempt's transaction); returns it if it opened."""
    row = session.scalars(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    if row is None:
        return None
    now = utcnow()
    before = Breaker(BreakerState(row.state), row.consecutive_failures, row.trips, row.open_until)
    after = after_attempt(before, failed, settings, now)
    if after == before:
        return None
    values: dict[str, object] = {
        "state": after.state.value,
        "consecutive_failures": after.consecutive_failures,
        "trips": after.trips,
        "open_until": after.open_until,
    }
    if failed:
        values["last_error"] = error
    if after.state != before.state:
        values["changed_at"] = now
    session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    opened = after.state == BreakerState.OPEN and after.open_until != before.open_until
    return after if opened else None


# --- what readers see -----------------------------------------------------------------------------


def deferral(endpoint: WebhookEndpoint | None, delivery: WebhookDelivery, busy: int, settings: Settings) -> str | None:
    """Why a pending delivery is not being attempted now, in words (``None`` if nothing holds it back)."""
    if endpoint is None or delivery.status != DeliveryStatus.PENDING.value:
        return None
    now = utcnow()
    if endpoint.state == BreakerState.OPEN.value and endpoint.open_until is not None and endpoint.open_until > now:
        return (
            f"deferred: the circuit breaker of {endpoint.origin} is open until {endpoint.open_until.isoformat()} "
            f"after {endpoint.consecutive_failures} failures in a row (last: {endpoint.last_error})"
        )
    claimed = delivery.claimed_until is not None and delivery.claimed_until > now
    due = delivery.next_attempt_at is not None and delivery.next_attempt_at <= now
    if due and not claimed:
        if endpoint.state != BreakerState.CLOSED.value and busy >= 1:
            return f"deferred: the circuit breaker of {endpoint.origin} is half-open and its probe is in flight"
        if busy >= settings.webhook_endpoint_concurrency:
            return f"deferred: {busy} attempts to {endpoint.origin} are in flight (its limit)"
    return None


@dataclass(frozen=True)
class Shown:
    """A delivery's endpoint as readers see it: the row, its attempts in flight, why the delivery waits."""

    endpoint: WebhookEndpoint
    in_flight: int
    deferred: str | None


def shown(session: Session, deliveries: Sequence[WebhookDelivery], settings: Settings) -> dict[str, Shown]:
    """Per delivery id (those with an endpoint): its endpoint, read once per endpoint."""
    ids = {d.endpoint_id for d in deliveries if d.endpoint_id is not None}
    if not ids:
        return {}
    rows = {e.id: e for e in session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.id.in_(ids)))}
    busy = {key: in_flight(session, key) for key in rows}
    found = {}
    for d in deliveries:
        endpoint = rows.get(d.endpoint_id or "")
        if endpoint is not None:
            found[d.id] = Shown(endpoint, busy[endpoint.id], deferral(endpoint, d, busy[endpoint.id], settings))
    return found
