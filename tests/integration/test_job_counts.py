"""db.counts on PostgreSQL: the trigger's rollup agrees with counting the table, through inserts, transitions,
deletes, compactions (also two at once) and transactions that roll back."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from gpujobs.harness.databases import create_postgres_database, drop_postgres_database, postgres_unavailable_reason


@pytest.fixture
def database() -> Iterator[str]:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)  # the trigger is PostgreSQL's; SQLite counts the table (test below)
    import migrations

    url = create_postgres_database("counts")
    try:
        migrations.upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO tenants (id, name, created_at) VALUES ('ten_a', 'a', now())")
        yield url
    finally:
        from db.session import dispose_engines

        dispose_engines()
        drop_postgres_database(url)


def _insert(conn: psycopg.Connection, first: int, count: int, job_type: str = "diagnostic") -> None:
    conn.execute(
        """
        INSERT INTO jobs (id, tenant_id, type, queue, status, input, metadata, progress, attempts, max_attempts,
                          deadline_seconds, created_at, webhook_events_filter, priority)
        SELECT 'job_' || i, 'ten_a', %s, 'gpu', 'queued', '{}', '{}', '{}', 0, 3, 900, now(), '[]', 5
        FROM generate_series(%s::int, %s::int) i
        """,
        (job_type, first, first + count - 1),
    )


def _truth(conn: psycopg.Connection) -> dict[tuple[str, str], int]:
    rows = conn.execute("SELECT type, status, count(*) FROM jobs GROUP BY type, status").fetchall()
    return {(t, s): n for t, s, n in rows}


def _counted(url: str) -> dict[tuple[str, str], int]:
    from db import counts
    from db.session import session_scope

    with session_scope(url) as session:
        return counts.counts(session)


def _compact(url: str) -> bool:
    from db import counts
    from db.session import session_scope

    with session_scope(url) as session:
        return counts.compact(session)


def test_counts_follow_inserts_transitions_and_deletes(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        _insert(conn, 1, 300)
        _insert(conn, 301, 20, "segmentation")
        assert _counted(database) == _truth(conn) == {("diagnostic", "queued"): 300, ("segmentation", "queued"): 20}
        conn.execute(
            "UPDATE jobs SET status = 'running' WHERE id IN (SELECT 'job_' || i FROM generate_series(1, 50) i)"
        )
        conn.execute("UPDATE jobs SET status = 'succeeded' WHERE id IN ('job_1', 'job_2', 'job_3')")
        conn.execute("UPDATE jobs SET status = status, priority = 7")  # no change of status: no delta
        assert _compact(database)
        assert _counted(database) == _truth(conn)
        assert conn.execute("SELECT count(*) FROM job_count_deltas").fetchone() == (0,)
        conn.execute("DELETE FROM jobs WHERE id IN ('job_1', 'job_4', 'job_300')")  # retention's purge
        conn.execute("UPDATE jobs SET status = 'failed' WHERE id = 'job_5'")
        with conn.transaction():  # several changes of one job in one transaction
            _insert(conn, 1000, 10)
            conn.execute("UPDATE jobs SET status = 'running' WHERE id LIKE 'job_100_'")
            conn.execute("UPDATE jobs SET status = 'canceled' WHERE id LIKE 'job_100_'")
        assert _counted(database) == _truth(conn)  # before compaction: rollup + deltas
        _compact(database)
        assert _counted(database) == _truth(conn)
        conn.execute("DELETE FROM jobs")
        _compact(database)
        assert _counted(database) == {} == _truth(conn)  # pairs at zero are left out


def test_rolled_back_writes_leave_no_delta(database: str) -> None:
    with psycopg.connect(database) as conn:
        _insert(conn, 1, 10)
        conn.commit()
        _insert(conn, 11, 10)
        conn.execute("UPDATE jobs SET status = 'running'")
        conn.rollback()
        assert _counted(database) == _truth(conn) == {("diagnostic", "queued"): 10}


def test_two_compactions_at_once_count_each_delta_once(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        _insert(conn, 1, 2000)
    results: list[bool] = []
    errors: list[BaseException] = []

    def writer() -> None:  # transitions committed while the compactions run
        try:
            with psycopg.connect(database, autocommit=True) as conn:
                for n in range(1, 400):
                    conn.execute("UPDATE jobs SET status = 'running' WHERE id = %s", (f"job_{n}",))
        except BaseException as exc:
            errors.append(exc)

    def compactor() -> None:
        try:
            for _ in range(20):
                results.append(_compact(database))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=compactor), threading.Thread(target=compactor)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert any(results)
    with psycopg.connect(database) as conn:
        assert _counted(database) == _truth(conn) == {("diagnostic", "queued"): 1601, ("diagnostic", "running"): 399}
        _compact(database)
        assert _counted(database) == _truth(conn)


def test_sqlite_counts_the_table(tmp_path) -> None:
    import migrations
    from db.models import Job, Tenant, utcnow
    from db.session import dispose_engines, session_scope
    from gpujobs.harness.databases import sqlite_url

    url = sqlite_url(tmp_path)
    migrations.upgrade(url)
    try:
        with session_scope(url) as session:
            session.add(Tenant(id="ten_a", name="a"))
            session.flush()
            for n in range(3):
                session.add(
                    Job(
                        tenant_id="ten_a",
                        type="diagnostic",
                        queue="gpu",
                        input={},
                        max_attempts=3,
                        deadline_seconds=900.0,
                        status="failed" if n == 0 else "queued",
                        created_at=utcnow(),
                    )
                )
        assert _counted(url) == {("diagnostic", "failed"): 1, ("diagnostic", "queued"): 2}
        assert _compact(url) is False
    finally:
        dispose_engines()
