"""db.retained on PostgreSQL: each tenant's running total of unexpired artifact bytes agrees with a plain SUM
through inserts, a second attempt's replaced outputs, expiry and purge by ``worker.retention``, a job's
deletion (cascading to its artifacts), rollbacks and compactions (also two at once, with writes between).

The suite's database: the beat's reconciler compacts in the background meanwhile, and other tests' tenants
are there too; every check compares all tenants, in one REPEATABLE READ snapshot.
"""

from __future__ import annotations

import secrets
import threading
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from db import retained, usage
from db.models import Artifact, Job, Tenant
from db.session import session_scope
from db.settings import get_settings
from db.storage import get_storage
from worker.retention import retention_batch

DAY = 86400
BIG = 3_000_000_000  # over 2**31: the deltas are bigint


@pytest.fixture
def pg(database_url: str) -> str:
    if not database_url.startswith("postgresql"):
        pytest.skip("the triggers are PostgreSQL's; SQLite sums the table (test below)")
    return database_url


def _conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _tenant(conn: psycopg.Connection) -> str:
    tenant = f"ten_bytes{secrets.token_hex(4)}"
    conn.execute("INSERT INTO tenants (id, name, created_at) VALUES (%s, %s, now())", (tenant, tenant))
    return tenant


def _jobs(conn: psycopg.Connection, tenant: str, count: int, days_ago: float = 0) -> list[str]:
    """Succeeded jobs, each with two artifacts (one of ``BIG`` bytes for every third job), ended days ago."""
    prefix = f"job_{secrets.token_hex(4)}_"
    conn.execute(
        """
        INSERT INTO jobs (id, tenant_id, type, queue, status, input, metadata, progress, attempts, max_attempts,
                          deadline_seconds, created_at, finished_at, webhook_events_filter, priority)
        SELECT %s || i, %s, 'diagnostic', 'gpu', 'succeeded', '{}', '{}', '{}', 1, 3, 900,
               now() - make_interval(secs => %s), now() - make_interval(secs => %s), '[]', 5
        FROM generate_series(1, %s) i
        """,
        (prefix, tenant, days_ago * DAY, days_ago * DAY, count),
    )
    ids = [f"{prefix}{i}" for i in range(1, count + 1)]
    _artifacts(conn, ids, days_ago)
    return ids


def _artifacts(conn: psycopg.Connection, job_ids: list[str], days_ago: float = 0, name: str = "out") -> None:
    conn.execute(
        """
        INSERT INTO artifacts (job_id, name, content_type, size, sha256, storage_key, created_at)
        SELECT j, %s || n, 'image/png', CASE WHEN n = 1 AND k %% 3 = 0 THEN %s ELSE 1000 * k + n END,
               repeat('0', 64), 'jobs/' || j || '/' || %s || n, now() - make_interval(secs => %s)
        FROM unnest(%s::text[]) WITH ORDINALITY AS t(j, k), generate_series(1, 2) n
        """,
        (name, BIG, name, days_ago * DAY, job_ids),
    )


def _check(url: str) -> dict[str, int]:
    """The totals db.retained reads against a SUM over the artifacts, both in one snapshot."""
    engine = create_engine(url, isolation_level="REPEATABLE READ")
    try:
        with Session(engine) as session:
            truth = {
                tenant_id: int(total)
                for tenant_id, total in session.execute(
                    select(Job.tenant_id, func.sum(Artifact.size))
                    .join(Job, Job.id == Artifact.job_id)
                    .where(Artifact.expired_at.is_(None))
                    .group_by(Job.tenant_id)
                )
                if total
            }
            tenants = list(session.scalars(select(Tenant.id)))
            assert retained.retained(session, tenants) == truth
            by_usage = usage.usage(session, tenants)
            assert {t: u.retained_bytes for t, u in by_usage.items() if u.retained_bytes} == truth
            for tenant_id in tenants[:5]:
                assert usage.retained_bytes(session, tenant_id) == truth.get(tenant_id, 0)
            return truth
    finally:
        engine.dispose()


def _compact(url: str) -> bool:
    with session_scope(url) as session:
        return retained.compact(session)


def _settings(**values: Any) -> Any:
    return get_settings().model_copy(update=values)


def test_totals_follow_inserts_expiry_purge_and_deletes(pg: str) -> None:
    with psycopg.connect(_conninfo(pg), autocommit=True) as conn:
        a, b, c = _tenant(conn), _tenant(conn), _tenant(conn)
        _jobs(conn, a, 30, days_ago=2)
        b_jobs = _jobs(conn, b, 20, days_ago=40)
        c_jobs = _jobs(conn, c, 10)
        totals = _check(pg)
        assert totals[a] > BIG and totals[b] > BIG and totals[c] > BIG

        with conn.transaction():  # a second attempt replaces its outputs (transitions.succeed)
            conn.execute("DELETE FROM artifacts WHERE job_id = %s", (c_jobs[2],))
            _artifacts(conn, [c_jobs[2]], name="again")
        assert _check(pg)[c] == totals[c] - BIG - 3002 + 2 * 1000 + 1 + 2  # the new rows are job 1 of 1

        # Expiry: tenant a keeps outputs 1 s; the default keeps them forever, jobs are never purged.
        conn.execute(
            "INSERT INTO tenant_quotas (tenant_id, artifact_ttl_seconds, updated_at) VALUES (%s, 1, now())"
            " ON CONFLICT (tenant_id) DO UPDATE SET artifact_ttl_seconds = 1",
            (a,),
        )
        storage = get_storage()
        expire_only = _settings(artifact_ttl=0, job_retention=0, retention_batch_size=25)
        report = retention_batch(expire_only, storage)
        assert report.artifacts_expired > 0
        assert _check(pg).get(a, 0) < totals[a]  # part of a's outputs expired, the rest not yet
        while retention_batch(expire_only, storage).artifacts_expired:
            pass
        assert a not in _check(pg)
        assert _compact(pg) in (True, False)  # False: the reconciler was compacting at that instant
        assert a not in _check(pg)

        # Purge: b's jobs are 40 days old, their outputs still there (deleted with them, children first).
        purge = _settings(artifact_ttl=0, job_retention=30 * DAY, retention_batch_size=7)
        while retention_batch(purge, storage).jobs_purged:
            pass
        assert conn.execute("SELECT count(*) FROM jobs WHERE id = ANY(%s)", (b_jobs,)).fetchone() == (0,)
        assert b not in _check(pg)

        # A job deleted on its own: its artifacts go by ON DELETE CASCADE, counted once.
        conn.execute("DELETE FROM jobs WHERE id = ANY(%s)", (c_jobs[:4],))
        after = _check(pg)
        assert after[c] == totals[c] - sum(1000 * k + n for k in (1, 2, 4) for n in (1, 2)) - BIG - 3002
        conn.execute("UPDATE artifacts SET expired_at = now() WHERE job_id = %s AND name = 'out1'", (c_jobs[5],))
        conn.execute("UPDATE artifacts SET content_type = 'image/webp' WHERE job_id = %s", (c_jobs[6],))  # no change
        assert _check(pg)[c] == after[c] - BIG
        conn.execute("DELETE FROM jobs WHERE id = %s", (c_jobs[5],))  # one artifact expired, one not
        assert _check(pg)[c] == after[c] - BIG - 6002
        _compact(pg)
        assert _check(pg)[c] == after[c] - BIG - 6002


def test_rolled_back_writes_leave_no_delta(pg: str) -> None:
    with psycopg.connect(_conninfo(pg)) as conn:
        tenant = _tenant(conn)
        jobs = _jobs(conn, tenant, 5)
        conn.commit()
        before = _check(pg)[tenant]
        _jobs(conn, tenant, 5)
        conn.execute("UPDATE artifacts SET expired_at = now() WHERE job_id = %s", (jobs[0],))
        conn.execute("DELETE FROM jobs WHERE id = %s", (jobs[1],))
        conn.rollback()
        assert _check(pg)[tenant] == before


def test_two_compactions_at_once_count_each_delta_once(pg: str) -> None:
    with psycopg.connect(_conninfo(pg), autocommit=True) as conn:
        tenant = _tenant(conn)
        jobs = _jobs(conn, tenant, 200)
    results: list[bool] = []
    errors: list[BaseException] = []

    def writer() -> None:  # outputs stored, expired and deleted while the compactions run
        try:
            with psycopg.connect(_conninfo(pg), autocommit=True) as conn:
                for n, job_id in enumerate(jobs[:150]):
                    if n % 3 == 0:
                        conn.execute("UPDATE artifacts SET expired_at = now() WHERE job_id = %s", (job_id,))
                    elif n % 3 == 1:
                        conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
                    else:
                        _artifacts(conn, [job_id], name="more")
        except BaseException as exc:
            errors.append(exc)

    def compactor() -> None:
        try:
            for _ in range(20):
                results.append(_compact(pg))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=compactor), threading.Thread(target=compactor)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert any(results)
    _check(pg)
    _compact(pg)
    assert _check(pg)[tenant] > 0


def test_sqlite_sums_the_artifacts(tmp_path) -> None:
    import migrations
    from db.models import utcnow
    from db.session import dispose_engines
    from gpujobs.harness.databases import sqlite_url

    url = sqlite_url(tmp_path)
    migrations.upgrade(url)
    try:
        with session_scope(url) as session:
            session.add_all([Tenant(id="ten_a", name="a"), Tenant(id="ten_b", name="b")])
            session.flush()
            job = Job(
                tenant_id="ten_a",
                type="diagnostic",
                queue="gpu",
                input={},
                max_attempts=3,
                deadline_seconds=900.0,
                status="succeeded",
                created_at=utcnow(),
            )
            session.add(job)
            session.flush()
            for n, size in enumerate([BIG, 5, 7]):
                session.add(
                    Artifact(
                        job_id=job.id,
                        name=f"out{n}",
                        content_type="image/png",
                        size=size,
                        sha256="0" * 64,
                        storage_key=f"k{n}",
                        expired_at=utcnow() if n == 2 else None,
                    )
                )
        with session_scope(url) as session:
            assert retained.retained(session, ["ten_a", "ten_b"]) == {"ten_a": BIG + 5}
            assert usage.retained_bytes(session, "ten_b") == 0
            assert retained.compact(session) is False
            assert session.execute(text("SELECT count(*) FROM retained_bytes_deltas")).scalar_one() == 0
    finally:
        dispose_engines()
