"""Per-tenant quotas at submit (``POST /v1/jobs``), and the 429 that every limit answers with.

A submit is refused (429 problem+json naming the quota) when the tenant already holds its
``max_queued_jobs``, when its unexpired artifacts take ``max_retained_bytes`` or more, or past
``submits_per_minute`` (all its keys together). The tenant's ``tenant_quotas`` row overrides the
``GPUJOBS_QUOTA_*`` defaults; 0 means no limit. ``max_running_jobs`` is the scheduler's, not checked here.

- The two database checks are cheap: the queued count stops at the limit (an index, no rows read), and
  the retained bytes are summed only when that quota is set. They are checked before the job's insert,
  not in one transaction with it, so concurrent submits of one tenant may pass a limit by as many as
  are in flight at that moment: a quota is a guard against runaway clients, not an exact count.
- Submits per minute are counted in Redis in fixed windows aligned on the clock, like the per-key
  request limit (``api.auth``), shared by every API process. With Redis unset, down
  or hung (its breaker open), submits are not counted and go through, as the per-key limit does.

Every 429 of a limit (these and the per-key request limit) carries ``Retry-After`` and the header
fields of the IETF draft (draft-ietf-httpapi-ratelimit-headers-06): ``RateLimit-Limit``,
``RateLimit-Remaining``, ``RateLimit-Reset`` (seconds) and ``RateLimit-Policy`` (``w`` for a window).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import redis
from sqlalchemy.orm import Session

from api.errors import ApiError
from db import notify, usage
from db.quotas import Quotas, at_submit
from db.settings import Settings

WINDOW_SECONDS = 60
# Queued jobs and stored bytes go down when jobs finish or artifacts expire: a client may look again soon.
QUEUED_RETRY_AFTER_SECONDS = 5
RETAINED_RETRY_AFTER_SECONDS = 60

clock: Callable[[], float] = time.time  # the windows' clock (a test moves it to the next window)


def too_many(
    detail: str,
    *,
    quota: str,
    limit: int,
    used: int,
    retry_after: int,
    window: int | None = None,
    title: str = "Quota exceeded",
) -> ApiError:
    """A 429 for ``quota`` with ``Retry-After`` and the ``RateLimit-*`` header fields."""
    policy = f"{limit};w={window}" if window else str(limit)
    headers = {
        "Retry-After": str(retry_after),
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(max(0, limit - used)),
        "RateLimit-Reset": str(retry_after),
        "RateLimit-Policy": f'{policy};comment="{quota}"',
    }
    return ApiError(429, detail, title=title, headers=headers, extra={"quota": quota, "limit": limit, "used": used})


def window_left(now: float, window: int = WINDOW_SECONDS) -> int:
    """Whole seconds until the current window ends (at least 1)."""
    return max(1, int(window - now % window))


def admit(session: Session, tenant_id: str, settings: Settings) -> Quotas:
    """Refuse a new job of ``tenant_id`` over one of its quotas (429); its quotas otherwise."""
    quotas, queued = at_submit(session, tenant_id, settings)
    if queued is not None and queued >= quotas.max_queued_jobs:
        raise too_many(
            f"This tenant already has {quotas.max_queued_jobs} queued jobs, its quota (max_queued_jobs); "
            "submit again when some have started or been canceled.",
            quota="max_queued_jobs",
            limit=quotas.max_queued_jobs,
            used=queued,
            retry_after=QUEUED_RETRY_AFTER_SECONDS,
        )
    if quotas.max_retained_bytes:
        stored = usage.retained_bytes(session, tenant_id)
        if stored >= quotas.max_retained_bytes:
            raise too_many(
                f"This tenant's stored job outputs take {stored} bytes, at or over its quota of "
                f"{quotas.max_retained_bytes} bytes (max_retained_bytes); submit again when outputs have expired "
                "or their jobs have been deleted.",
                quota="max_retained_bytes",
                limit=quotas.max_retained_bytes,
                used=stored,
                retry_after=RETAINED_RETRY_AFTER_SECONDS,
            )
    if quotas.submits_per_minute:
        _count_submit(tenant_id, quotas.submits_per_minute, settings)
    return quotas


def _counter(tenant_id: str, window: int) -> str:
    return f"gpujobs:submits:{tenant_id}:{window}"


def _count_submit(tenant_id: str, limit: int, settings: Settings) -> None:
    found = notify.available_client(settings)
    if found is None:
        return
    client, breaker = found
    now = clock()
    name = _counter(tenant_id, int(now // WINDOW_SECONDS))
    try:
        pipe = client.pipeline(transaction=False)
        pipe.incr(name)
        pipe.expire(name, 2 * WINDOW_SECONDS)
        count = int(pipe.execute()[0])
    except redis.RedisError as exc:  # a Redis outage must not refuse submits
        breaker.failed("counting a submit", exc)
        return
    breaker.succeeded()
    if count > limit:
        retry_after = window_left(now)
        raise too_many(
            f"More than {limit} job submits in a minute for this tenant, its quota (submits_per_minute); "
            f"retry after {retry_after} s.",
            quota="submits_per_minute",
            limit=limit,
            used=count,
            retry_after=retry_after,
            window=WINDOW_SECONDS,
        )


def submits_this_minute(tenant_ids: Collection[str], settings: Settings) -> dict[str, int | None]:
    """Each tenant's submits counted in the current window (None for all when Redis cannot tell)."""
    ids = list(dict.fromkeys(tenant_ids))
    unknown: dict[str, int | None] = dict.fromkeys(ids)
    found = notify.available_client(settings) if ids else None
    if found is None:
        return unknown
    client, breaker = found
    window = int(clock() // WINDOW_SECONDS)
    try:
        values = client.mget([_counter(tenant_id, window) for tenant_id in ids])
    except redis.RedisError as exc:
        breaker.failed("reading submit counts", exc)
        return unknown
    breaker.succeeded()
    return {tenant_id: int(value or 0) for tenant_id, value in zip(ids, values, strict=True)}
