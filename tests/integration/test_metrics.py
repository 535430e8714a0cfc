"""``/metrics/cluster``: Prometheus text that parses, and numbers that match the database; lost workers; the token."""

from __future__ import annotations

import os
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest

from gpujobs.harness.processes import Stack
from tests.integration.admin_client import logged_in, page
from tests.integration.client import assert_problem, diagnostic, wait_for

WINDOW = 7 * 86400  # every job of this test session is inside it


@pytest.fixture(scope="module")
def metrics_app(services: Any) -> Any:
    import api
    from db.settings import Settings

    return api.create_app(Settings(metrics_window_seconds=WINDOW))


def scrape(app: Any) -> dict[str, Any]:
    """The families by name, as ``prometheus_client``'s own parser reads the answer."""
    from prometheus_client.parser import text_string_to_metric_families

    response = app.test_client().get("/metrics/cluster")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return {family.name: family for family in text_string_to_metric_families(response.get_data(as_text=True))}


def samples(family: Any, name: str | None = None) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if name is None or s.name == name}


def value(family: Any, **labels: str) -> float:
    return samples(family, family.name).get(tuple(sorted(labels.items())), 0.0)


# --- what the database says, computed here independently ------------------------------------------


def db_jobs() -> list[Any]:
    from sqlalchemy import select

    from db.models import Job
    from db.session import session_scope

    with session_scope() as session:
        return session.execute(
            select(Job.type, Job.status, Job.queue, Job.created_at, Job.started_at, Job.finished_at)
        ).all()


def test_metrics_parse_and_match_the_database_after_a_known_set_of_jobs(metrics_app, client, keys, gpu_worker):
    from db import transitions
    from db.session import session_scope

    admin = keys.admin.secret
    from tests.integration.conftest import quiesce

    quiesce()  # jobs of earlier tests must not finish between the two scrapes
    before = scrape(metrics_app)
    jobs = [diagnostic(client, admin, steps=2) for _ in range(3)]
    jobs.append(diagnostic(client, admin, fail=True))
    doomed = diagnostic(client, admin, steps=40, sleep_seconds=20)
    with session_scope() as session:
        transitions.request_cancel(session, doomed["id"])
    for job in [*jobs, doomed]:
        wait_for(client, admin, job["id"], ("succeeded", "failed", "canceled"))
    wait_for(client, admin, doomed["id"], "canceled")
    after = scrape(metrics_app)

    # The known set of jobs, as deltas of the gauge.
    delta = {
        status: value(after["gpujobs_jobs"], type="diagnostic", status=status)
        - value(before["gpujobs_jobs"], type="diagnostic", status=status)
        for status in ("queued", "running", "succeeded", "failed", "canceled")
    }
    assert delta == {"queued": 0, "running": 0, "succeeded": 3, "failed": 1, "canceled": 1}, delta

    # Every (type, status) equals a count of the rows; every type and status has its series.
    rows = db_jobs()
    counts = Counter((row.type, row.status) for row in rows)
    exposed = samples(after["gpujobs_jobs"])
    from worker.jobs import job_types

    assert {dict(labels)["type"] for labels in exposed} >= set(job_types())
    for labels, number in exposed.items():
        key = (dict(labels)["type"], dict(labels)["status"])
        assert number == counts.get(key, 0), (key, number, counts.get(key, 0))

    # Durations and webhook attempts are the processes' counters now (tests/integration/test_prometheus.py).
    assert "gpujobs_job_run_seconds" not in after and "gpujobs_webhook_attempts" not in after

    # Deliveries equal the rows; the oldest queued job's age is 0 on a drained queue.
    from sqlalchemy import select

    from db.models import WebhookDelivery

    with session_scope() as session:
        statuses = Counter(session.scalars(select(WebhookDelivery.status)).all())
    for status in ("pending", "delivered", "failed", "gave_up"):
        assert value(after["gpujobs_webhook_deliveries"], status=status) == statuses.get(status, 0)

    assert value(after["gpujobs_oldest_queued_job_age_seconds"], queue="gpu") == 0
    assert value(after["gpujobs_broker_up"]) == 1
    queues = {dict(k)["queue"] for k in samples(after["gpujobs_queue_depth"])}
    assert queues == {"gpu", "train", "webhooks", "maintenance"}


def workers_in_db(lost_after: float) -> Counter[str]:
    """Workers by state, from the heartbeat rows (stopped ones, and lost ones older than the window, left out)."""
    from sqlalchemy import select

    from db.models import WorkerProcess, utcnow
    from db.session import session_scope

    with session_scope() as session:
        rows = session.execute(select(WorkerProcess.last_seen_at, WorkerProcess.stopped_at)).all()
    now = utcnow()
    return Counter(
        "alive" if now - r.last_seen_at <= timedelta(seconds=lost_after) else "lost"
        for r in rows
        if r.stopped_at is None and now - r.last_seen_at <= timedelta(seconds=WINDOW)
    )


def stable_workers(app: Any, lost_after: float) -> tuple[Counter[str], dict[str, Any]]:
    """The database's count and a scrape taken between two equal reads of it (a beat may cross the threshold)."""
    for _ in range(20):
        first, scraped, second = workers_in_db(lost_after), scrape(app), workers_in_db(lost_after)
        if first == second:
            return first, scraped
    raise AssertionError("the workers' states never held still for one scrape")


def test_workers_alive_and_gpu_memory_match_the_heartbeats(metrics_app, gpu_worker):
    """Alive = not stopped and heard from within worker_lost_seconds; a CUDA heartbeat gives memory gauges."""
    from sqlalchemy import update

    from db.models import WorkerProcess, utcnow
    from db.session import session_scope

    # A heartbeat as a GPU worker writes it (this machine has no GPU to make a real one).
    gpu_row = f"metrics-test-gpu@host:{os.getpid()}:abc123"
    with session_scope() as session:
        session.add(
            WorkerProcess(
                id=gpu_row,
                hostname="gpu-host",
                pid=os.getpid(),
                queues=["gpu"],
                models={},
                current_jobs=["job_x"],
                device={"type": "cuda", "name": "NVIDIA H100", "memory_used_mb": 1536, "memory_total_mb": 81559},
            )
        )
    try:
        expected, scraped = stable_workers(metrics_app, 30.0)
        assert expected["alive"] >= 3  # the gpu and maintenance workers, the row above
        for state in ("alive", "lost"):
            assert value(scraped["gpujobs_workers"], state=state) == expected[state], state
        labels = {"worker": "metrics-test-gpu", "host": "gpu-host"}  # stable: no pid, no random suffix
        assert value(scraped["gpujobs_worker_gpu_memory_used_bytes"], **labels) == 1536 * 2**20
        assert value(scraped["gpujobs_worker_gpu_memory_total_bytes"], **labels) == 81559 * 2**20
        assert value(scraped["gpujobs_worker_current_jobs"], **labels) == 1
    finally:
        with session_scope() as session:
            session.execute(update(WorkerProcess).where(WorkerProcess.id == gpu_row).values(stopped_at=utcnow()))


def test_a_killed_worker_shows_as_lost_within_the_threshold(services, keys):
    """SIGKILL a worker that beats every 0.5 s; with worker_lost_seconds=3 it is lost 3 s after its last beat."""
    from sqlalchemy import select

    import api
    from db.models import WorkerProcess
    from db.session import session_scope
    from db.settings import Settings

    lost_after, heartbeat = 3.0, 0.5
    app = api.create_app(Settings(worker_lost_seconds=lost_after, metrics_window_seconds=WINDOW))
    stack = Stack({**os.environ, "GPUJOBS_HEARTBEAT_SECONDS": str(heartbeat)}, services.root / "logs", label="lost")
    worker = stack.start_worker("train", concurrency=1)
    try:
        with session_scope() as session:
            [worker_id] = session.scalars(
                select(WorkerProcess.id).where(WorkerProcess.id.like(f"{worker.node}@%"))
            ).all()
        browser = logged_in(app.test_client(), keys.admin.secret)

        def state() -> str:
            html = page(browser, "/admin/workers")
            marker = f'data-worker="{worker_id}" data-state="'
            assert marker in html, f"{worker_id} is not on the workers page"
            return html.split(marker, 1)[1].split('"', 1)[0]

        assert state() == "alive"
        time.sleep(2 * heartbeat)  # let it beat again, so its last beat is just before the kill
        worker.kill()
        killed_at = time.monotonic()
        assert state() == "alive"  # silent for less than the threshold: not lost yet
        while (current := state()) != "lost":
            elapsed = time.monotonic() - killed_at
            assert elapsed < lost_after + 3.0, f"still {current!r} {elapsed:.1f}s after SIGKILL"
            time.sleep(0.2)
        elapsed = time.monotonic() - killed_at
        assert lost_after - heartbeat - 0.5 <= elapsed <= lost_after + 3.0, elapsed
        # /metrics counts it too (with every other worker silent for 3 s: the session's beat every 5 s).
        expected, scraped = stable_workers(app, lost_after)
        assert expected["lost"] >= 1 and value(scraped["gpujobs_workers"], state="lost") == expected["lost"]
    finally:
        stack.stop_all()


def test_the_metrics_token_protects_the_endpoint_when_set(services):
    import api
    from db.settings import Settings

    protected = api.create_app(Settings(metrics_token="s3cret-token")).test_client()
    for path, family in (("/metrics", b"gpujobs_build_info"), ("/metrics/cluster", b"gpujobs_jobs")):
        assert_problem(protected.get(path), 401)
        assert_problem(protected.get(path, headers={"Authorization": "Bearer wrong"}), 401)
        assert_problem(protected.get(path, headers={"Authorization": "Bearer s3cret-tokén"}), 401)
        response = protected.get(path, headers={"Authorization": "Bearer s3cret-token"})
        assert response.status_code == 200 and family in response.data, path


def test_queue_depth_comes_from_the_broker(metrics_app, client, keys, no_gpu_worker):
    from sqlalchemy import func, select

    from db.models import Job
    from db.session import session_scope
    from worker.celery_app import queue_depths

    jobs = [diagnostic(client, keys.admin.secret) for _ in range(2)]  # nothing consumes the gpu queue now
    with session_scope() as session:
        ids = [job["id"] for job in jobs]
        sent = session.execute(
            select(func.count()).select_from(Job).where(Job.id.in_(ids), Job.dispatched_at.is_not(None))
        ).scalar_one()
    # The scheduler sends only the buffer (and the slots of a worker a test killed, until it counts as lost);
    # the other job waits in the database. The gauge is what the broker holds.
    assert 1 <= sent <= 2
    scraped = scrape(metrics_app)
    assert value(scraped["gpujobs_queue_depth"], queue="gpu") == queue_depths()["gpu"] == sent
    assert value(scraped["gpujobs_jobs_queued"], queue="gpu") == 2
    assert value(scraped["gpujobs_jobs"], type="diagnostic", status="queued") == len(jobs)
    assert value(scraped["gpujobs_oldest_queued_job_age_seconds"], queue="gpu") > 0
