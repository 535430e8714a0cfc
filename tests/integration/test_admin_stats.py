"""The admin dashboard's numbers (``api/stats.py``) against values computed here, independently, from known
job rows: queue-wait and run-time percentiles (PostgreSQL's ``percentile_cont`` and the SQLite fallback),
failure rate, throughput per bucket and GPU-seconds per tenant. On both databases, each a fresh one with
the migrations applied, holding only the rows this test writes (times far from now, so nothing else
could fall in their windows)."""

from __future__ import annotations

import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gpujobs.harness.databases import create_postgres_database, drop_postgres_database, postgres_unavailable_reason

SINCE = datetime(2031, 3, 4, 12, 0, tzinfo=UTC)  # the window starts here
UNTIL = SINCE + timedelta(hours=1)
BUCKET = 600  # throughput buckets of 10 minutes
TYPES = {"diagnostic": "gpu", "segmentation": "gpu", "finetune": "train"}


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    import migrations

    if request.param == "postgresql":
        reason = postgres_unavailable_reason()
        if reason:
            pytest.fail(f"PostgreSQL is needed for percentile_cont: {reason}", pytrace=False)
        url = create_postgres_database("stats")
    else:
        url = f"sqlite:///{tmp_path / 'stats.db'}"
    try:
        migrations.upgrade(url)
        yield url
    finally:
        from db.session import dispose_engines

        dispose_engines()
        if request.param == "postgresql":
            drop_postgres_database(url)


def known_jobs(url: str) -> list[dict[str, Any]]:
    """Two tenants' jobs: inside the window with seeded random waits and runs, a few before it (left out),
    some queued, running, failed and canceled."""
    from db.models import Job, Tenant
    from db.session import session_scope

    rng = random.Random(17)
    rows: list[dict[str, Any]] = []
    for n in range(120):
        job_type = rng.choice(sorted(TYPES))
        created = SINCE + timedelta(seconds=rng.uniform(-1800, 3000))
        wait = round(rng.expovariate(1 / 20), 3)
        run = round(rng.uniform(0.5, 240), 3)
        status = rng.choices(["succeeded", "failed", "canceled", "running", "queued"], [60, 20, 8, 6, 6])[0]
        started = None if status == "queued" else created + timedelta(seconds=wait)
        finished = started + timedelta(seconds=run) if status in ("succeeded", "failed", "canceled") else None
        if finished is not None and finished > UNTIL:
            finished = None
            status = "running"
        rows.append(
            {
                "id": f"job_stats{n:04d}",
                "tenant_id": rng.choice(["ten_alpha", "ten_beta"]),
                "type": job_type,
                "queue": TYPES[job_type],
                "status": status,
                "created_at": created,
                "started_at": started,
                "finished_at": finished,
            }
        )
    with session_scope(url) as session:
        session.add_all([Tenant(id="ten_alpha", name="alpha", created_at=SINCE), Tenant(id="ten_beta", name="beta")])
        session.flush()
        for row in rows:
            session.add(Job(**row, input={}, max_attempts=3, deadline_seconds=900))
    return rows


def test_the_dashboards_numbers_match_the_rows(database: str) -> None:
    from api import stats
    from db.session import session_scope

    rows = known_jobs(database)
    with session_scope(database) as session:
        run = stats.percentiles(session, "run", SINCE)
        wait = stats.percentiles(session, "queue_wait", SINCE)
        finished = stats.finished_since(session, SINCE)
        buckets = stats.throughput(session, SINCE, UNTIL, BUCKET)
        usage = {t.id: t for t in stats.tenant_usage(session, SINCE)}

    # Percentiles: statistics.quantiles' "inclusive" method is the same linear interpolation as percentile_cont.
    def expected(durations: dict[str, list[float]]) -> dict[str, dict[float, float]]:
        out = {}
        for job_type, values in durations.items():
            cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
            out[job_type] = {q: cuts[round(q * 100) - 1] for q in stats.PERCENTILES}
        return out

    runs: dict[str, list[float]] = defaultdict(list)
    waits: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["finished_at"] is not None and row["finished_at"] >= SINCE:
            runs[row["type"]].append((row["finished_at"] - row["started_at"]).total_seconds())
        if row["started_at"] is not None and row["started_at"] >= SINCE:
            waits[row["type"]].append((row["started_at"] - row["created_at"]).total_seconds())
    for found, truth in ((run, expected(runs)), (wait, expected(waits))):
        assert set(found) == set(truth) == set(TYPES)
        for job_type, quantiles in truth.items():
            for q, value in quantiles.items():
                assert found[job_type][q] == pytest.approx(value, abs=1e-3), (job_type, q)

    # Failure rate: failed / (succeeded + failed) of the jobs finished in the window; cancels are not failures.
    ended = Counter(
        (row["type"], row["status"]) for row in rows if row["finished_at"] is not None and row["finished_at"] >= SINCE
    )
    assert finished == dict(ended)
    failed = sum(n for (_, status), n in ended.items() if status == "failed")
    succeeded = sum(n for (_, status), n in ended.items() if status == "succeeded")
    assert failed and succeeded
    assert stats.failure_rate(finished) == pytest.approx(failed / (failed + succeeded))

    # Throughput: finished jobs per 10-minute bucket and status, empty buckets included.
    per_bucket: dict[datetime, Counter[str]] = defaultdict(Counter)
    for row in rows:
        if row["finished_at"] is not None and row["finished_at"] >= SINCE:
            start = datetime.fromtimestamp(row["finished_at"].timestamp() // BUCKET * BUCKET, UTC)
            per_bucket[start][row["status"]] += 1
    assert [b.start for b in buckets] == [SINCE + timedelta(seconds=BUCKET * i) for i in range(7)]
    assert {b.start: b.counts for b in buckets if b.counts} == {k: dict(v) for k, v in per_bucket.items()}
    assert sum(b.total for b in buckets) == sum(ended.values())

    # GPU-seconds per tenant: run time of gpu/train jobs that finished in the window; jobs submitted by status.
    for tenant in ("ten_alpha", "ten_beta"):
        mine = [row for row in rows if row["tenant_id"] == tenant]
        gpu_seconds = sum(
            (row["finished_at"] - row["started_at"]).total_seconds()
            for row in mine
            if row["finished_at"] is not None and row["finished_at"] >= SINCE and row["queue"] in ("gpu", "train")
        )
        assert usage[tenant].gpu_seconds == pytest.approx(gpu_seconds, abs=1e-3), tenant
        submitted = Counter(row["status"] for row in mine if row["created_at"] >= SINCE)
        assert usage[tenant].jobs == dict(submitted), tenant
