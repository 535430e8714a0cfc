"""A deployment of its own for fault tests, and what they measure: probes, timings, the figures table.

The deployment runs the real commands (`gpujobs api` with gevent workers, a worker, beat) against a
private PostgreSQL (``private_services``), a private Redis (broker and Redis at once) and a private
S3, which the tests may freeze (SIGSTOP) and kill (SIGKILL), then bring back on the same port and
data. The bounds are short settings, so that a whole matrix fits in a few minutes.
"""

from __future__ import annotations

import io
import re
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

from gpujobs.harness.processes import Stack
from gpujobs.harness.servers import EmbeddedRedis, EmbeddedS3
from tests.integration.private_services import PrivatePostgres

# Settings of the fault deployment. The S3 and Redis timeouts are read once the storage and Redis
# branches of issue 13 are in; the PostgreSQL, broker and readiness ones are this branch's.
FAULT_SETTINGS = {
    "GPUJOBS_DATABASE_CONNECT_TIMEOUT_SECONDS": "2",
    "GPUJOBS_DATABASE_STATEMENT_TIMEOUT_SECONDS": "1",
    "GPUJOBS_DATABASE_POOL_TIMEOUT_SECONDS": "2",
    "GPUJOBS_BROKER_TIMEOUT_SECONDS": "1",
    "GPUJOBS_READINESS_TIMEOUT_SECONDS": "1",
    "GPUJOBS_READINESS_CACHE_SECONDS": "0.2",
    "GPUJOBS_REDIS_CONNECT_TIMEOUT_SECONDS": "0.5",
    "GPUJOBS_REDIS_SOCKET_TIMEOUT_SECONDS": "0.5",
    "GPUJOBS_REDIS_BREAKER_SECONDS": "1",
    "GPUJOBS_S3_CONNECT_TIMEOUT_SECONDS": "1",
    "GPUJOBS_S3_READ_TIMEOUT_SECONDS": "1",
    "GPUJOBS_S3_MAX_ATTEMPTS": "2",
    "GPUJOBS_STORAGE_RETRY_WINDOW_SECONDS": "120",
    # Longer than a fault plus its bound: an outage of a dependency must not look like a dead worker.
    "GPUJOBS_LEASE_SECONDS": "10",
    "GPUJOBS_RATE_LIMIT_PER_MINUTE": "1000000",
}

HEALTHZ_BOUND = 0.1  # issue 13: /healthz under 100 ms whatever the dependencies do
# The probe runs in a thread of the test process, beside the threads that call the affected routes: one
# probe of a case may be late by that process's own scheduling (seen: 1 of 87 at 135 ms, the median 5 ms).
# Two late probes in a case, or one past HEALTHZ_CEILING, fail it.
HEALTHZ_LATE_ALLOWED = 1
HEALTHZ_CEILING = 0.5
READYZ_BOUND = 2.0  # issue 13: /readyz answers within 2 s in every state
UNAFFECTED_BOUND = 1.0  # a route that does not need the failed dependency answers as usual
RECOVER_BOUND = 1.0  # issue 13: everything recovers within 1 s of the dependency's return
# When an affected route must have its 503 (or, for a submit with the broker down, its 202):
BOUNDS = {
    # a hung server: the ping of a pooled connection (connect timeout), then one new connection
    "postgres": 2 * 2 + 1.0,
    # the send (broker timeout) plus Redis' rate limiter (its socket timeout), with slack
    "redis": 1 + 0.5 + 1.0,
    # two tries of (connect + read) timeouts, with slack
    "s3": 2 * (1 + 1) + 1.0,
}


def png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "teal").save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Answer:
    """One HTTP exchange: status (None when it did not answer), seconds, headers, body."""

    status: int | None
    seconds: float
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    error: str | None = None

    @property
    def problem_503(self) -> bool:
        return (
            self.status == 503
            and self.headers.get("Content-Type", "").startswith("application/problem+json")
            and bool(self.headers.get("Retry-After"))
        )

    def describe(self) -> str:
        if self.status is None:
            return f"no answer after {self.seconds:.2f}s ({self.error})"
        return f"{self.status} after {self.seconds:.2f}s"


@dataclass
class FaultDeployment:
    root: Path
    postgres: PrivatePostgres
    redis: EmbeddedRedis
    s3: EmbeddedS3
    stack: Stack
    base_url: str
    admin_key: str
    admin: requests.Session  # logged in to the dashboard
    job_id: str = ""  # a finished job, for the reads
    file_id: str = ""

    # --- HTTP ------------------------------------------------------------------------------------

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}", **extra}

    def call(self, method: str, path: str, timeout: float = 30.0, session: Any = None, **kwargs: Any) -> Answer:
        started = time.monotonic()
        try:
            response = (session or requests).request(method, self.base_url + path, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            return Answer(None, time.monotonic() - started, error=type(exc).__name__)
        seconds = time.monotonic() - started
        try:
            body = response.json()
        except ValueError:
            body = response.text[:300]
        return Answer(response.status_code, seconds, dict(response.headers), body)

    def submit(self, idempotency_key: str, timeout: float = 30.0, **params: Any) -> Answer:
        body = {"type": "diagnostic", "input": params or {"steps": 1}}
        headers = self.headers(**{"Idempotency-Key": idempotency_key})
        return self.call("POST", "/v1/jobs", timeout=timeout, json=body, headers=headers)

    def upload(self, timeout: float = 30.0) -> Answer:
        files = {"file": ("dot.png", png_bytes(), "image/png")}
        return self.call("POST", "/v1/files", timeout=timeout, files=files, headers=self.headers())

    def routes(self) -> dict[str, Callable[[float], Answer]]:
        """Every kind of route, by name: each a call taking its client timeout."""
        auth = self.headers()
        json_only = self.headers(Accept="application/problem+json, application/json")
        return {
            "GET job": lambda t: self.call("GET", f"/v1/jobs/{self.job_id}", t, headers=auth),
            "GET jobs": lambda t: self.call("GET", "/v1/jobs?limit=5", t, headers=auth),
            "submit": lambda t: self.submit(f"probe-{time.monotonic_ns()}", t),
            "upload": lambda t: self.upload(t),
            "GET file": lambda t: self.call("GET", f"/v1/files/{self.file_id}", t, headers=auth),
            "GET keys": lambda t: self.call("GET", "/v1/keys", t, headers=auth),
            "GET models": lambda t: self.call("GET", "/v1/models", t, headers=auth),
            "metrics": lambda t: self.call("GET", "/metrics/cluster", t),
            "admin jobs": lambda t: self.call("GET", "/admin/jobs", t, session=self.admin, headers=json_only),
            "openapi": lambda t: self.call("GET", "/openapi.json", t),
            "readyz": lambda t: self.call("GET", "/readyz", t),
        }

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        answer = self.call("GET", "/readyz", 5)
        while answer.status != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            answer = self.call("GET", "/readyz", 5)
        assert answer.status == 200, f"the deployment is not ready after {timeout:g}s: {answer.body}"

    # --- faults ----------------------------------------------------------------------------------

    def fault(self, dependency: str, sig: signal.Signals) -> None:
        if dependency == "postgres":
            self.postgres.freeze() if sig == signal.SIGSTOP else self.postgres.kill()
            return
        server = self.redis if dependency == "redis" else self.s3
        server.freeze() if sig == signal.SIGSTOP else server.kill()

    def restore(self, dependency: str, sig: signal.Signals) -> None:
        """Bring the dependency back (SIGCONT, or a start on the same port and data); returns once it answers."""
        if dependency == "postgres":
            self.postgres.thaw() if sig == signal.SIGSTOP else self.postgres.start()
            return
        server = self.redis if dependency == "redis" else self.s3
        server.thaw() if sig == signal.SIGSTOP else server.restart()

    # --- the jobs' truth, read from the database itself ------------------------------------------

    def job_rows(self, prefix: str) -> list[dict[str, Any]]:
        query = """
            SELECT j.idempotency_key, j.id, j.status, j.attempts,
                   (SELECT count(*) FROM job_events e WHERE e.job_id = j.id AND e.kind = 'succeeded')
            FROM jobs j WHERE j.idempotency_key LIKE %s ORDER BY j.idempotency_key
        """
        with psycopg.connect(self.postgres.conninfo()) as conn:
            rows = conn.execute(query, (prefix + "%",)).fetchall()
        return [dict(zip(("key", "id", "status", "attempts", "succeeded_events"), row, strict=True)) for row in rows]


# --- measuring -------------------------------------------------------------------------------------


class HealthzProbe:
    """GETs /healthz on a new connection every ``every`` seconds in a thread, keeping each latency."""

    def __init__(self, deployment: FaultDeployment, every: float = 0.05) -> None:
        self.deployment = deployment
        self.every = every
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthzProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            answer = self.deployment.call("GET", "/healthz", timeout=5)
            self.latencies.append(answer.seconds)
            if answer.status != 200:
                self.failures.append(answer.describe())
            self._stop.wait(self.every)

    def summary(self) -> str:
        if not self.latencies:
            return "no probe"
        return (
            f"{len(self.latencies)} probes, median {statistics.median(self.latencies) * 1000:.0f} ms, "
            f"max {max(self.latencies) * 1000:.0f} ms"
        )


def concurrently(calls: dict[str, Callable[[], Answer]]) -> dict[str, Answer]:
    """Run every call in a thread of its own; their answers by name."""
    answers: dict[str, Answer] = {}

    def run(name: str, call: Callable[[], Answer]) -> None:
        answers[name] = call()

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


def first_success(call: Callable[[float], Answer], ok: Callable[[Answer], bool], timeout: float) -> float | None:
    """Seconds until ``call`` first answers ``ok``, polling tightly (20 ms); None if not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        answer = call(max(0.5, timeout - (time.monotonic() - started)))
        if ok(answer):
            return time.monotonic() - started
        time.sleep(0.02)
    return None


@dataclass
class CaseFigures:
    case: str
    bound: float
    to_503: str = "-"
    healthz: str = "-"
    readyz: str = "-"
    unaffected: str = "-"
    recover: str = "-"
    jobs: int = 0
    lost: int = 0
    duplicated: int = 0
    reruns: int = 0
    problems: list[str] = field(default_factory=list)


def table(figures: list[CaseFigures]) -> str:
    head = (
        "| fault | bound (s) | affected routes: answer | /healthz | /readyz | unaffected routes | "
        "time to recover | jobs | lost | duplicated | re-run |"
    )
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for f in figures:
        rows.append(
            f"| {f.case} | {f.bound:g} | {f.to_503} | {f.healthz} | {f.readyz} | {f.unaffected} | {f.recover} | "
            f"{f.jobs} | {f.lost} | {f.duplicated} | {f.reruns} |"
        )
    failing = [f for f in figures if f.problems]
    if failing:
        rows.append("")
        rows += [f"- {f.case}: " + "; ".join(f.problems) for f in failing]
    return "\n".join(rows)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
