"""Failed-authentication throttling: per client address and per presented key prefix.

A failure is a presented key that is unknown or revoked (on ``/v1`` or at the admin login); a
missing or malformed ``Authorization`` header guesses nothing and is not counted. Counts are fixed
windows of ``auth_failure_window_seconds`` aligned on the clock, kept in Redis (shared by every API
process; bounded, behind the Redis breaker of :mod:`db.notify`) and in this process when Redis is
unavailable (then each process counts on its own).

- **Per address** (``auth_failure_limit``, default 20 a minute): once an address reaches the limit,
  every request from it that presents a key is a 429 until the window ends, *before* the key is
  looked up, so a correct guess cannot be told from a wrong one. Valid keys used from that address
  are refused too: that is what a per-address limit means (a shared NAT shares it); 20 failures a
  minute is far above what a client with a mistyped or revoked key makes before its operator
  notices, and far below what guessing needs.
- **Per key prefix** (the first 12 characters, ``gpj_`` and 8 random ones for a generated key;
  ``auth_failure_prefix_limit``, default 10 a minute, from any address): one wrong key retried, or
  guesses at one key spread over many addresses. Past the limit, a key with that prefix that fails
  is a 429 (not a 401) until the window ends; the key is still looked up, so a *valid* key with that
  prefix keeps working: knowing the first characters of someone's key must not let anyone lock it
  out. Valid keys with other prefixes from the same addresses keep working too, as long as their
  address is under its own limit. Lower than the per-address limit because one wrong key has no
  reason to be tried again and again.

Each API process learns of a block at its first failure from that address or prefix (the shared
count is read as it is incremented), so a block costs no Redis round trip on the requests of valid
keys. Prefixes are hashed before they are used in Redis key names.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass

import redis
from flask import Flask, current_app, request

from db import notify
from db.settings import Settings

log = logging.getLogger(__name__)

PREFIX_CHARS = 12
LOCAL_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Refusal:
    """A 429: when to come back, and why."""

    retry_after: int
    detail: str
    quota: str  # the limit's name in the 429's RateLimit-Policy and problem ("auth_failures_per_address", …)
    limit: int
    window: int


class AuthThrottle:
    def __init__(self, settings: Settings, clock=time.time) -> None:  # type: ignore[no-untyped-def]
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._blocked: dict[str, float] = {}  # ident → until (clock time)
        self._local: dict[tuple[str, int], int] = {}  # (ident, window) → failures, when Redis is unavailable

    # --- what is counted ----------------------------------------------------------------------

    def _limits(self, address: str, token: str) -> list[tuple[str, int, str]]:
        """(ident, limit, what) for each enabled limit."""
        found = []
        if self.settings.auth_failure_limit:
            found.append((f"addr:{address}", self.settings.auth_failure_limit, "from your address"))
        if self.settings.auth_failure_prefix_limit:
            digest = hashlib.sha256(token[:PREFIX_CHARS].encode("utf-8", "replace")).hexdigest()[:24]
            found.append((f"prefix:{digest}", self.settings.auth_failure_prefix_limit, "with this key's prefix"))
        return found

    def _refusal(self, ident: str, limit: int, what: str, until: float, now: float) -> Refusal:
        retry_after = max(1, math.ceil(until - now))
        quota = "auth_failures_per_address" if ident.startswith("addr:") else "auth_failures_per_key_prefix"
        return Refusal(
            retry_after,
            f"Too many failed authentications {what}; retry after {retry_after} s.",
            quota,
            limit,
            self.settings.auth_failure_window_seconds,
        )

    # --- the two calls --------------------------------------------------------------------------

    def check(self, address: str, token: str) -> Refusal | None:
        """Before a key is looked up: a refusal while its address is blocked (a blocked prefix refuses only
        keys that fail their lookup, in :meth:`failed`)."""
        if not self._blocked:
            return None
        now = self.clock()
        for ident, limit, what in self._limits(address, token):
            if ident.startswith("prefix:"):
                continue
            until = self._blocked.get(ident)
            if until is not None and now < until:
                return self._refusal(ident, limit, what, until, now)
        return None

    def failed(self, address: str, token: str) -> Refusal | None:
        """Count one failed authentication; a refusal when it went past a limit (the 401 otherwise stands)."""
        limits = self._limits(address, token)
        if not limits:
            return None
        now = self.clock()
        window = self.settings.auth_failure_window_seconds
        index = int(now // window)
        until = (index + 1) * window
        counts = self._count([ident for ident, _, _ in limits], index, window)
        refusal = None
        for (ident, limit, what), count in zip(limits, counts, strict=True):
            if count >= limit:
                self._block(ident, until, now)
            if count > limit and refusal is None:
                refusal = self._refusal(ident, limit, what, until, now)
        return refusal

    # --- counting -----------------------------------------------------------------------------

    def _count(self, idents: list[str], index: int, window: int) -> list[int]:
        found = notify.available_client(self.settings)
        if found is not None:
            client, breaker = found
            try:
                pipe = client.pipeline(transaction=False)
                for ident in idents:
                    name = f"gpujobs:authfail:{ident}:{index}"
                    pipe.incr(name)
                    pipe.expire(name, window + 5)
                results = pipe.execute()
            except redis.RedisError as exc:
                breaker.failed("counting a failed authentication", exc)
            else:
                breaker.succeeded()
                return [int(results[2 * i]) for i in range(len(idents))]
        return self._count_here(idents, index)

    def _count_here(self, idents: list[str], index: int) -> list[int]:
        with self._lock:
            if len(self._local) >= LOCAL_MAX_ENTRIES:
                self._local = {key: n for key, n in self._local.items() if key[1] >= index}
                if len(self._local) >= LOCAL_MAX_ENTRIES:  # a flood of distinct addresses: start over
                    self._local.clear()
            counts = []
            for ident in idents:
                count = self._local[ident, index] = self._local.get((ident, index), 0) + 1
                counts.append(count)
            return counts

    def _block(self, ident: str, until: float, now: float) -> None:
        with self._lock:
            if len(self._blocked) >= LOCAL_MAX_ENTRIES:
                self._blocked = {key: t for key, t in self._blocked.items() if t > now}
                if len(self._blocked) >= LOCAL_MAX_ENTRIES:
                    self._blocked.clear()
            known = self._blocked.get(ident, 0.0)
            self._blocked[ident] = max(until, known)
        if known <= now:  # once per block and process, not once per refused request
            log.warning("too many failed authentications (%s): refused for %.0f s", ident, until - now)


def client_address(settings: Settings) -> str:
    """The client's address: the TCP peer, or the entry ``trusted_proxy_hops`` from the right of
    ``X-Forwarded-For`` when that many proxies append to it (entries further left are the client's word)."""
    hops = settings.trusted_proxy_hops
    if hops:
        forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",") if part.strip()]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    return request.remote_addr or "unknown"


def throttle(app: Flask | None = None) -> AuthThrottle:
    """The app's throttle (one per app and process)."""
    app = app or current_app
    found = app.extensions.get("gpujobs_auth_throttle")
    if found is None:
        found = app.extensions.setdefault("gpujobs_auth_throttle", AuthThrottle(app.config["GPUJOBS_SETTINGS"]))
    return found  # type: ignore[no-any-return]
