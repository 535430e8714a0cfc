"""Bearer-key authentication, tenant scoping and per-key rate limits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import redis
from flask import g, request

from api import config
from api.errors import ApiError
from db import notify
from db.keys import Identity, find_active_key
from db.models import Role

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def current_key() -> Identity:
    return g.api_key  # type: ignore[no-any-return]


def is_admin() -> bool:
    return current_key().role == Role.ADMIN.value


def authenticate() -> None:
    """Before every /v1 request: resolve the key, or answer 401."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    unauthorized = {"WWW-Authenticate": 'Bearer realm="gpujobs"'}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Send an API key as `Authorization: Bearer <key>`.", headers=unauthorized)
    key = find_active_key(g.db, token.strip())
    if key is None:
        raise ApiError(401, "The API key is unknown or has been revoked.", headers=unauthorized)
    g.api_key = key
    _rate_limit(key)


def require_admin(view: F) -> F:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not is_admin():
            raise ApiError(403, "This needs an admin key.")
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _rate_limit(key: Identity) -> None:
    settings = config.settings()
    limit = settings.rate_limit_per_minute
    client = notify.redis_client(settings) if limit else None
    if client is None:
        return
    window = int(time.time() // 60)
    counter = f"gpujobs:rate:{key.id}:{window}"
    try:
        pipe = client.pipeline(transaction=False)
        pipe.incr(counter)
        pipe.expire(counter, 120)
        count = pipe.execute()[0]
    except redis.RedisError as exc:  # fail open: a Redis blip must not take the API down
        log.warning("rate limit unavailable: %s", exc)
        return
    if count > limit:
        retry_after = max(1, 60 - int(time.time()) % 60)
        raise ApiError(
            429,
            f"More than {limit} requests in a minute for this key; retry after {retry_after} s.",
            headers={"Retry-After": str(retry_after)},
        )
