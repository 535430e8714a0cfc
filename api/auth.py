"""Bearer-key authentication, tenant scoping, per-key rate limits and failed-authentication throttling."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import redis
from flask import g, request

from api import config, quotas
from api.errors import ApiError
from api.quotas import WINDOW_SECONDS, too_many, window_left
from api.throttle import Refusal, client_address, throttle
from db import notify
from db.keys import Identity, find_active_key
from db.models import Role

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def current_key() -> Identity:
    return g.api_key  # type: ignore[no-any-return]


def is_admin() -> bool:
    return current_key().role == Role.ADMIN.value


def authenticate(token_scheme: bool = False) -> None:
    """Before every /v1 request: resolve the key, or answer 401 (429 past the failed-authentication limits).

    ``token_scheme``: ``Authorization: Token <key>`` (Replicate's older scheme) is taken as well as ``Bearer``."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    unauthorized = {"WWW-Authenticate": 'Bearer realm="gpujobs"'}
    token = token.strip()
    if scheme.lower() not in (("bearer", "token") if token_scheme else ("bearer",)) or not token:
        raise ApiError(401, "Send an API key as `Authorization: Bearer <key>`.", headers=unauthorized)
    guard = throttle()
    address = client_address(config.settings())
    refusal = guard.check(address, token)
    if refusal is None:
        key = find_active_key(g.db, token)
        if key is not None:
            g.api_key = key
            _rate_limit(key)
            return
        refusal = guard.failed(address, token)
        if refusal is None:
            raise ApiError(401, "The API key is unknown or has been revoked.", headers=unauthorized)
    raise too_many_failures(refusal)


def too_many_failures(refusal: Refusal) -> ApiError:
    """The 429 of the failed-authentication limits, with ``Retry-After`` and ``RateLimit-*`` as every limit's."""
    return too_many(
        refusal.detail,
        quota=refusal.quota,
        limit=refusal.limit,
        used=refusal.limit,
        retry_after=refusal.retry_after,
        window=refusal.window,
        title="Too many failed authentications",
    )


def require_admin(view: F) -> F:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not is_admin():
            raise ApiError(403, "This needs an admin key.")
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _rate_limit(key: Identity) -> None:
    """Fail open: with Redis unset, down or hung (its breaker open), the request goes through."""
    settings = config.settings()
    limit = settings.rate_limit_per_minute
    found = notify.available_client(settings) if limit else None
    if found is None:
        return
    client, breaker = found
    now = quotas.clock()
    window = int(now // WINDOW_SECONDS)
    counter = f"gpujobs:rate:{key.id}:{window}"
    try:
        pipe = client.pipeline(transaction=False)
        pipe.incr(counter)
        pipe.expire(counter, 2 * WINDOW_SECONDS)
        count = pipe.execute()[0]
    except redis.RedisError as exc:  # a Redis outage must not take the API down
        breaker.failed("rate limit", exc)
        return
    breaker.succeeded()
    if count > limit:
        retry_after = window_left(now)
        raise too_many(
            f"More than {limit} requests in a minute for this key; retry after {retry_after} s.",
            quota="rate_limit_per_minute",
            limit=limit,
            used=count,
            retry_after=retry_after,
            window=WINDOW_SECONDS,
            title="Too Many Requests",
        )
