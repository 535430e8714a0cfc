"""Liveness (``/healthz``) and readiness (``/readyz``).

- ``/healthz`` answers from memory: no database session, no key lookup, no rate limit, no Redis,
  broker or S3 call (``create_app`` skips its request hooks for it). It says the process serves
  requests, nothing more, so a liveness probe never restarts an API because a dependency is down.
- ``/readyz`` names the state of each dependency: the database, the broker, Redis when it is not
  the broker, and storage. The checks run concurrently, each in a thread of its own (a greenlet
  under gevent), and the answer comes within ``readiness_timeout_seconds`` whatever they do: a
  check that has not finished by then is reported down. The result is reused for
  ``readiness_cache_seconds``, and a check still running from an earlier probe is waited for
  again rather than started twice, so a flood of probes costs each dependency at most one call
  in flight per API process.
- ``/readyz`` also says, under ``queues``, each queue's work, alive consumers and whether it is
  stalled (work and no consumer: ``api.stats.queue_health``). A stall does not make ``/readyz``
  answer 503: every API replica sees the same stall, so an unready API would only be taken out of
  its Service (Kubernetes) or load balancer, turning a missing worker into a full outage of the API,
  which still accepts jobs that run once a worker serves the queue. A stall is for alerts
  (``gpujobs_queue_stalled``) and the dashboard; this detail tells the operator which queue.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify
from kombu.connection import Connection
from sqlalchemy import text

from api import config, stats
from api.errors import problem
from api.openapi import document
from db import notify
from db.session import get_engine, session_scope
from db.settings import Settings
from db.storage import Storage

bp = Blueprint("health", __name__)

# Endpoints that must not touch a dependency in the app's request hooks (session, auth, limits).
NO_DEPENDENCIES = frozenset({"health.healthz", "health.readyz"})
OK = "ok"


@bp.get("/healthz")
@document(
    "Liveness: 200 while the process serves requests (touches no dependency)", public=True, responses={200: "Health"}
)
def healthz() -> Response:
    return jsonify({"status": "ok"})


class _Run:
    """One run of a check, in a thread of its own; ``state`` is set when it ends."""

    def __init__(self, name: str, check: Callable[[], object]) -> None:
        self.check = check
        self.state: str | None = None
        self.result: object = None
        self.thread = threading.Thread(target=self._run, name=f"readiness-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.check()
            self.state = OK
        except Exception as exc:
            self.state = f"down: {type(exc).__name__}: {str(exc)[:200]}"


class Readiness:
    """Concurrent dependency checks with a deadline, a short cache and one run per check at a time.

    ``details`` are run the same way (same deadline, cache, one run at a time) but only reported: what
    they return (or ``{"error": …}``) is shown, and does not decide readiness."""

    def __init__(
        self,
        checks: dict[str, Callable[[], None]],
        timeout: float,
        cache_seconds: float,
        details: dict[str, Callable[[], object]] | None = None,
    ) -> None:
        self.checks = checks
        self.details = details or {}
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._cached: tuple[dict[str, str], dict[str, Any]] | None = None
        self._cached_at = -math.inf

    def states(self) -> dict[str, str]:
        """``{dependency: "ok" | "down: …"}``, within ``timeout`` seconds."""
        return self.report()[0]

    def report(self) -> tuple[dict[str, str], dict[str, Any]]:
        """The dependencies' states and the details' results, within ``timeout`` seconds."""
        started = time.monotonic()
        with self._lock:
            if self._cached is not None and started - self._cached_at < self.cache_seconds:
                return self._cached
            runs = {}
            for name, check in {**self.checks, **self.details}.items():
                run = self._runs.get(name)
                if run is None or not run.thread.is_alive():
                    run = self._runs[name] = _Run(name, check)
                runs[name] = run
        deadline = started + self.timeout
        for run in runs.values():
            run.thread.join(max(0.0, deadline - time.monotonic()))
        states = {
            name: run.state if run.state is not None else f"down: no answer within {self.timeout:g} s"
            for name, run in runs.items()
        }
        details = {name: runs[name].result if states[name] == OK else {"error": states[name]} for name in self.details}
        found = ({name: states[name] for name in self.checks}, details)
        with self._lock:
            self._cached, self._cached_at = found, time.monotonic()
        return found


def readiness_checks(settings: Settings, storage: Storage) -> dict[str, Callable[[], None]]:
    """The dependencies of the API and how to ask each one whether it answers (bounded calls)."""
    timeout = settings.readiness_timeout_seconds
    engine = get_engine(settings.database_url, settings)

    def database() -> None:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def broker() -> None:
        options = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
        with Connection(settings.broker_url, connect_timeout=timeout, transport_options=options) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            connection.default_channel  # noqa: B018  (opening a Redis channel PINGs the server)

    checks: dict[str, Callable[[], None]] = {"database": database, "broker": broker}
    redis_url = settings.effective_redis_url
    if redis_url is not None and redis_url != settings.broker_url:
        # The process's bounded client, past the breaker: readiness wants Redis's state, not the breaker's.
        client = notify.redis_client(settings)

        def redis_check() -> None:
            if client is not None:
                client.ping()

        checks["redis"] = redis_check
    checks["storage"] = lambda: storage.ping(timeout)  # one try within the readiness bound, not the S3 one
    return checks


def queue_details(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each queue's work, alive consumers and stall, for ``/readyz`` (reported, never a 503)."""
    with session_scope(settings.database_url) as session:
        health = stats.queue_health(session, settings.worker_lost_seconds)
    return {
        queue: {"work": state.work, "consumers": state.consumers, "stalled": state.stalled}
        for queue, state in health.items()
    }


def _readiness(app: Flask) -> Readiness:
    readiness: Readiness | None = app.extensions.get("gpujobs_readiness")
    if readiness is None:
        settings = config.settings()
        readiness = Readiness(
            readiness_checks(settings, config.storage()),
            settings.readiness_timeout_seconds,
            settings.readiness_cache_seconds,
            details={"queues": lambda: queue_details(settings)},
        )
        app.extensions["gpujobs_readiness"] = readiness
    return readiness


@bp.get("/readyz")
@document(
    "Readiness: 200 when the database, broker, Redis and storage answer, else 503; names each one's state, "
    "and each queue's work, consumers and stall (a stalled queue does not make it 503)",
    public=True,
    responses={200: "Readiness", 503: "Problem"},
)
def readyz() -> Response:
    readiness = _readiness(current_app._get_current_object())  # type: ignore[attr-defined]
    checks, details = readiness.report()
    queues = details["queues"]
    stalled = sorted(name for name, state in queues.items() if isinstance(state, dict) and state.get("stalled"))
    down = [name for name, state in checks.items() if state != OK]
    if down:
        retry_after = max(1, math.ceil(readiness.cache_seconds))
        return problem(
            503,
            f"Not ready: {', '.join(down)} down.",
            headers={"Retry-After": str(retry_after)},
            extra={"checks": checks, "queues": queues, "stalled_queues": stalled},
        )
    return jsonify({"status": "ready", "checks": checks, "queues": queues, "stalled_queues": stalled})
