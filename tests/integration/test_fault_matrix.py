"""Issue 13's fault matrix: each dependency (PostgreSQL, Redis, S3) frozen (SIGSTOP) and killed (SIGKILL).

A deployment of its own (``faults.FaultDeployment``: `gpujobs api` with gevent workers, a worker and
beat on private PostgreSQL, Redis and S3 servers) is faulted one dependency at a time. While it is
down: ``/healthz`` answers under 100 ms (one late probe per case tolerated, none over 500 ms: the
probe shares the test process with the fault's other calls), ``/readyz`` within 2 s naming it, the routes that need it
answer 503 problem+json with ``Retry-After`` within the bound of its settings (a submit with the
broker down is accepted instead), the routes that do not need it answer as usual. After it comes
back (SIGCONT, or a start on the same port and data) the routes answer within 1 s, and every job
submitted before or during the fault ends succeeded exactly once. The figures of each case are
printed as a table at the end of the run (and written to ``fault-matrix.md`` in pytest's temporary
directory).
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from gpujobs.harness.processes import Stack
from gpujobs.harness.servers import start_redis, start_s3
from tests.integration.admin_client import CSRF
from tests.integration.conftest import make_key
from tests.integration.faults import (
    BOUNDS,
    FAULT_SETTINGS,
    HEALTHZ_BOUND,
    HEALTHZ_CEILING,
    HEALTHZ_LATE_ALLOWED,
    READYZ_BOUND,
    RECOVER_BOUND,
    UNAFFECTED_BOUND,
    Answer,
    CaseFigures,
    FaultDeployment,
    HealthzProbe,
    concurrently,
    first_success,
    slug,
    table,
)
from tests.integration.private_services import PrivatePostgres, postgres_bin

NAMES = {"postgres": "PostgreSQL", "redis": "Redis (broker)", "s3": "S3"}
FINISHED = ("succeeded", "failed", "canceled")
JOBS_TIMEOUT = 90.0
FAULT_SECONDS = 5.0  # at least; the jobs submitted before it run 2 s


@dataclass(frozen=True)
class Plan:
    """What a dependency's fault should do to the API."""

    affected: dict[str, int]  # route → the status it must answer within the bound (503: problem+json)
    unaffected: list[str]  # routes that must answer 2xx within UNAFFECTED_BOUND
    recovery: str  # the route timed from the dependency's return to its first 2xx
    submits_accepted: bool  # whether a submit during the fault is a 202 (else a 503, sent again after)
    notes: dict[str, str] = field(default_factory=dict)


READS = ["GET job", "GET jobs", "GET file", "GET keys", "GET models"]
PLANS = {
    "postgres": Plan(
        affected=dict.fromkeys([*READS, "submit", "upload", "metrics", "admin jobs"], 503),
        unaffected=["openapi"],
        recovery="GET job",
        submits_accepted=False,
    ),
    # Redis is the broker and the rate limiter's store here: submits are accepted (the reconciler
    # sends them later), reads go on, /metrics says broker_up 0.
    "redis": Plan(
        affected={"submit": 202, "metrics": 200},
        unaffected=[*READS, "upload"],
        recovery="readyz",
        submits_accepted=True,
    ),
    "s3": Plan(
        affected={"upload": 503},
        unaffected=[*READS, "submit", "metrics"],
        recovery="upload",
        submits_accepted=True,
    ),
}
CASES = [(dependency, sig) for dependency in PLANS for sig in (signal.SIGSTOP, signal.SIGKILL)]


# --- the deployment and the figures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_deployment(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultDeployment]:
    import migrations
    from db.session import dispose_engines

    if postgres_bin() is None:
        pytest.fail("the fault matrix needs PostgreSQL's server binaries (/usr/lib/postgresql/*/bin)")
    root = tmp_path_factory.mktemp("faults")
    postgres = redis = s3 = stack = deployment = None
    try:
        postgres = PrivatePostgres.create()
        migrations.upgrade(postgres.url)
        redis = start_redis(root / "redis")
        s3 = start_s3(root / "s3")
        env = {
            **os.environ,
            **FAULT_SETTINGS,
            "GPUJOBS_DATABASE_URL": postgres.url,
            "GPUJOBS_BROKER_URL": redis.url,
            "GPUJOBS_S3_ENDPOINT_URL": s3.endpoint_url,
            "GPUJOBS_S3_ACCESS_KEY": s3.access_key,
            "GPUJOBS_S3_SECRET_KEY": s3.secret_key,
            "GPUJOBS_VAR_DIR": str(root / "var"),
        }
        env.pop("GPUJOBS_REDIS_URL", None)
        stack = Stack(env, root / "logs", label="faults")
        worker = stack.start_worker("gpu,maintenance", concurrency=2, wait=False)
        stack.start_beat()
        _, base_url = stack.start_api(workers=2)  # gevent, as `gpujobs api` serves by default
        stack.wait_worker_ready(worker)
        admin = make_key("faults admin", "admin", database_url=postgres.url)
        deployment = FaultDeployment(root, postgres, redis, s3, stack, base_url, admin.secret, _dashboard(base_url))
        _log_in(deployment)
        deployment.file_id = deployment.upload().body["id"]
        job = deployment.submit("setup", timeout=60, steps=1)
        deployment.job_id = job.body["id"]
        yield deployment
    finally:
        if stack is not None:
            stack.stop_all()
        for server in (deployment.redis if deployment else redis, deployment.s3 if deployment else s3):
            if server is not None:
                server.stop()
        if postgres is not None:
            postgres.close()
        dispose_engines()


def _dashboard(base_url: str) -> requests.Session:
    session = requests.Session()
    session.headers["Accept"] = "text/html"
    return session


def _log_in(deployment: FaultDeployment) -> None:
    page = deployment.admin.get(f"{deployment.base_url}/admin/login", timeout=10)
    match = CSRF.search(page.text)
    assert match, page.text[:500]
    form = {"csrf_token": match.group(1), "key": deployment.admin_key}
    response = deployment.admin.post(f"{deployment.base_url}/admin/login", data=form, timeout=10, allow_redirects=False)
    assert response.status_code == 303, response.text[:500]


class _Summary:
    """Prints the figures at the end of the run (a plugin registered by the ``figures`` fixture)."""

    def __init__(self, figures: list[CaseFigures], path: Path) -> None:
        self.figures = figures
        self.path = path

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.figures:
            terminalreporter.write_sep("=", "fault matrix (issue 13)")
            terminalreporter.write_line(table(self.figures))
            terminalreporter.write_line(f"(written to {self.path})")


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[CaseFigures]]:
    collected: list[CaseFigures] = []
    path = tmp_path_factory.getbasetemp() / "fault-matrix.md"
    request.config.pluginmanager.register(_Summary(collected, path), "gpujobs-fault-matrix")
    yield collected
    path.write_text(table(collected) + "\n")


# --- one case ----------------------------------------------------------------------------------------


def _expected(route: str, status: int, bound: float, answer: Answer) -> str | None:
    """Why ``answer`` is not what ``route`` must answer within ``bound`` (None when it is)."""
    if status == 503 and not answer.problem_503:
        return f"{route}: wanted a 503 problem+json with Retry-After, got {answer.describe()}"
    if status != 503 and answer.status != status:
        return f"{route}: wanted {status}, got {answer.describe()}"
    if answer.seconds > bound:
        return f"{route}: answered after {answer.seconds:.2f}s, over the bound of {bound:g}s"
    return None


def _recovery_times(calls: dict[str, Callable[[float], Answer]], timeout: float) -> dict[str, float | None]:
    """From now, each route's time to its first 2xx (polled tightly, all at once)."""
    times: dict[str, float | None] = {}

    def measure(name: str, call: Callable[[float], Answer]) -> None:
        times[name] = first_success(call, lambda a: a.status is not None and 200 <= a.status < 300, timeout)

    threads = [threading.Thread(target=measure, args=item, daemon=True) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    return times


def _wait_for_jobs(deployment: FaultDeployment, prefix: str, keys: list[str]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + JOBS_TIMEOUT
    rows = deployment.job_rows(prefix)
    while time.monotonic() < deadline:
        by_key = {row["key"]: row for row in rows}
        if all(key in by_key and by_key[key]["status"] in FINISHED for key in keys):
            break
        time.sleep(0.25)
        rows = deployment.job_rows(prefix)
    return rows


@pytest.mark.parametrize(("dependency", "sig"), CASES, ids=[f"{dependency}-{sig.name}" for dependency, sig in CASES])
def test_a_dependency_down_or_hung(
    fault_deployment: FaultDeployment, figures: list[CaseFigures], dependency: str, sig: signal.Signals
) -> None:
    d, plan, bound = fault_deployment, PLANS[dependency], BOUNDS[dependency]
    f = CaseFigures(f"{NAMES[dependency]} {sig.name}", bound)
    figures.append(f)
    d.wait_ready()
    prefix = f"{slug(f.case)}-{secrets.token_hex(3)}-"
    before = [f"{prefix}before-{i}" for i in range(3)]
    for key in before:  # running (two) and queued (one) through the fault
        answer = d.submit(key, steps=4, sleep_seconds=2)
        assert answer.status == 202, answer.describe()
    during = [f"{prefix}during-{i}" for i in range(2)]
    routes = d.routes()

    faulted = time.monotonic()
    d.fault(dependency, sig)
    try:
        calls: dict[str, Callable[[], Answer]] = {
            route: (lambda r=route: routes[r](bound + 10)) for route in [*plan.affected, *plan.unaffected]
        }
        calls["readyz"] = lambda: routes["readyz"](10)
        for key in during:
            calls[key] = lambda k=key: d.submit(k, bound + 10, steps=2, sleep_seconds=1)
        with HealthzProbe(d) as healthz:
            time.sleep(0.3)  # the affected requests are under way (hanging, for a frozen server)
            answers = concurrently(calls)
            # Long enough that the jobs running when it began reach their end (and their writes) meanwhile.
            time.sleep(max(0.3, FAULT_SECONDS - (time.monotonic() - faulted)))
    finally:
        d.restore(dependency, sig)
    recovered = _recovery_times({plan.recovery: routes[plan.recovery], "readyz": routes["readyz"]}, 30)

    # While it was down.
    f.healthz = healthz.summary()
    late = [seconds for seconds in healthz.latencies if seconds >= HEALTHZ_BOUND]
    if (
        healthz.failures
        or not healthz.latencies
        or len(late) > HEALTHZ_LATE_ALLOWED
        or max(healthz.latencies) >= HEALTHZ_CEILING
    ):
        f.problems.append(
            f"/healthz: {f.healthz}, {len(late)} over {HEALTHZ_BOUND * 1000:.0f} ms, {len(healthz.failures)} failed"
        )
    ready = answers["readyz"]
    f.readyz = ready.describe()
    if not ready.problem_503 or ready.seconds > READYZ_BOUND:
        f.problems.append(f"/readyz: wanted a 503 within {READYZ_BOUND:g}s, got {ready.describe()}")
    named = {"postgres": "database", "redis": "broker", "s3": "storage"}[dependency]
    checks = ready.body.get("checks", {}) if isinstance(ready.body, dict) else {}
    if ready.status == 503 and not str(checks.get(named, "")).startswith("down"):
        f.problems.append(f"/readyz does not say that {named} is down: {ready.body}")
    f.to_503 = ", ".join(f"{route} {answers[route].describe()}" for route in plan.affected)
    f.problems += [
        p for route, status in plan.affected.items() if (p := _expected(route, status, bound, answers[route]))
    ]
    f.unaffected = f"max {max(answers[r].seconds for r in plan.unaffected):.2f}s" if plan.unaffected else "-"
    for route in plan.unaffected:
        answer = answers[route]
        if answer.status is None or not 200 <= answer.status < 300 or answer.seconds > UNAFFECTED_BOUND:
            f.problems.append(f"{route} (unaffected): {answer.describe()}, wanted 2xx within {UNAFFECTED_BOUND:g}s")
    for key in during:
        want = 202 if plan.submits_accepted else 503
        if problem := _expected(f"submit during the fault ({key})", want, bound, answers[key]):
            f.problems.append(problem)

    # After it came back.
    f.recover = ", ".join(
        f"{route} {'never' if seconds is None else f'{seconds:.2f}s'}" for route, seconds in recovered.items()
    )
    for route, seconds in recovered.items():
        if seconds is None or seconds > RECOVER_BOUND:
            f.problems.append(f"{route} recovered after {seconds}s, over {RECOVER_BOUND:g}s")
    for key in during:
        if answers[key].status != 202:  # a client sends it again, with the same key
            again = d.submit(key, steps=2, sleep_seconds=1)
            if again.status not in (200, 202):
                f.problems.append(f"submit {key} after recovery: {again.describe()}")

    keys = before + during
    rows = _wait_for_jobs(d, prefix, keys)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append(row)
    f.jobs = len(keys)
    f.lost = sum(1 for key in keys if not any(row["status"] == "succeeded" for row in by_key.get(key, [])))
    f.duplicated = sum(len(found) - 1 for found in by_key.values()) + sum(
        max(0, row["succeeded_events"] - 1) for row in rows
    )
    f.reruns = sum(1 for row in rows if row["attempts"] > 1)
    if f.lost or f.duplicated or f.reruns:
        f.problems.append(f"jobs: {f.lost} lost, {f.duplicated} duplicated, {f.reruns} run more than once: {rows}")

    assert not f.problems, "\n".join(f.problems)
