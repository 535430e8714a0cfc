"""db.gpu_seconds on PostgreSQL: the trigger's buckets agree with summing the finished jobs, through starts,
finishes, cancels before a start, rollbacks, compactions and the pruning of buckets that left the window."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from gpujobs.harness.databases import create_postgres_database, drop_postgres_database, postgres_unavailable_reason

WINDOW = 600.0


@pytest.fixture
def database() -> Iterator[str]:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)  # the trigger is PostgreSQL's; SQLite sums the jobs (tests/unit/test_dispatcher.py)
    import migrations

    url = create_postgres_database("gpusecs")
    try:
        migrations.upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO tenants (id, name, created_at) VALUES ('ten_a', 'a', now()), ('ten_b', 'b', now())"
            )
        yield url
    finally:
        from db.session import dispose_engines

        dispose_engines()
        drop_postgres_database(url)


def _insert(conn: psycopg.Connection, tenant: str, first: int, count: int, queue: str = "gpu") -> None:
    conn.execute(
        """
        INSERT INTO jobs (id, tenant_id, type, queue, status, input, metadata, progress, attempts, max_attempts,
                          deadline_seconds, created_at, webhook_events_filter, priority)
        SELECT 'job_' || i, %s, 'diagnostic', %s, 'queued', '{}', '{}', '{}', 0, 3, 900, now(), '[]', 5
        FROM generate_series(%s::int, %s::int) i
        """,
        (tenant, queue, first, first + count - 1),
    )


def _finish(conn: psycopg.Connection, first: int, last: int, run_seconds: float, ago: float = 0.0) -> None:
    """Jobs first..last started, then finished ``ago`` seconds ago after ``run_seconds`` (one transaction:
    one ``now()`` for both, so the run times are exact)."""
    with conn.transaction():
        _start_and_end(conn, first, last, run_seconds, ago)


def _start_and_end(conn: psycopg.Connection, first: int, last: int, run_seconds: float, ago: float) -> None:
    conn.execute(
        """
        UPDATE jobs SET status = 'running', started_at = now() - make_interval(secs => %(ago)s + %(run)s)
        WHERE id IN (SELECT 'job_' || i FROM generate_series(%(first)s::int, %(last)s::int) i)
        """,
        {"ago": ago, "run": run_seconds, "first": first, "last": last},
    )
    conn.execute(
        """
        UPDATE jobs SET status = 'succeeded', finished_at = now() - make_interval(secs => %(ago)s)
        WHERE id IN (SELECT 'job_' || i FROM generate_series(%(first)s::int, %(last)s::int) i)
        """,
        {"ago": ago, "first": first, "last": last},
    )


def _truth(conn: psycopg.Connection, queue: str = "gpu") -> dict[str, tuple[float, int]]:
    rows = conn.execute(
        """
        SELECT tenant_id, sum(extract(epoch FROM finished_at - started_at)), count(*) FROM jobs
        WHERE queue = %s AND started_at IS NOT NULL AND finished_at >= now() - make_interval(secs => %s)
        GROUP BY tenant_id
        """,
        (queue, WINDOW),
    ).fetchall()
    return {tenant: (round(float(seconds), 3), jobs) for tenant, seconds, jobs in rows}


def _recent(url: str, queue: str = "gpu") -> dict[str, tuple[float, int]]:
    from db import gpu_seconds
    from db.session import session_scope

    with session_scope(url) as session:
        found = gpu_seconds.recent(session, queue, ["ten_a", "ten_b", "ten_c"], WINDOW)
    return {tenant: (round(seconds, 3), jobs) for tenant, (seconds, jobs) in found.items()}


def _compact(url: str) -> bool:
    from db import gpu_seconds
    from db.session import session_scope

    with session_scope(url) as session:
        return gpu_seconds.compact(session, WINDOW)


def test_the_buckets_follow_finishes_and_compaction_keeps_them(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        _insert(conn, "ten_a", 1, 30)
        _insert(conn, "ten_b", 31, 10)
        _insert(conn, "ten_b", 41, 5, queue="train")
        assert _recent(database) == {}, "nothing finished yet"
        _finish(conn, 1, 20, run_seconds=1.5)
        _finish(conn, 31, 34, run_seconds=4.0, ago=30)
        _finish(conn, 41, 45, run_seconds=9.0)  # another queue
        conn.execute("UPDATE jobs SET status = 'canceled', finished_at = now() WHERE id = 'job_25'")  # never started
        conn.execute("UPDATE jobs SET priority = 7 WHERE id = 'job_1'")  # no new finish: no delta
        expected = {"ten_a": (30.0, 20), "ten_b": (16.0, 4)}
        assert _truth(conn) == expected
        assert _recent(database) == expected, "read from the deltas"
        assert _recent(database, "train") == {"ten_b": (45.0, 5)}
        assert conn.execute("SELECT count(*) FROM gpu_seconds_deltas").fetchone() == (29,)

        assert _compact(database)
        assert conn.execute("SELECT count(*) FROM gpu_seconds_deltas").fetchone() == (0,)
        assert _recent(database) == expected, "read from the buckets"

        _finish(conn, 21, 24, run_seconds=2.0)  # more after the compaction: buckets plus deltas
        expected = {"ten_a": (38.0, 24), "ten_b": (16.0, 4)}
        assert _recent(database) == _truth(conn) == expected


def test_a_rolled_back_finish_leaves_no_seconds(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        _insert(conn, "ten_a", 1, 3)
    with psycopg.connect(database) as conn:  # one transaction, rolled back
        _start_and_end(conn, 1, 3, run_seconds=2.0, ago=0.0)
        conn.rollback()
    assert _recent(database) == {}
    with psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM gpu_seconds_deltas").fetchone() == (0,)


def test_buckets_that_left_the_window_are_not_counted_and_are_pruned(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        _insert(conn, "ten_a", 1, 6)
        _finish(conn, 1, 3, run_seconds=1.0, ago=WINDOW + 120)  # two minutes before the window
        _finish(conn, 4, 6, run_seconds=2.0, ago=5)
        assert _recent(database) == _truth(conn) == {"ten_a": (6.0, 3)}
        assert _compact(database)
        buckets = conn.execute("SELECT sum(jobs) FROM gpu_seconds").fetchone()
        assert buckets == (3,), "the old bucket is dropped at the compaction, the recent one kept"
        assert _recent(database) == {"ten_a": (6.0, 3)}


def test_the_migration_fills_the_buckets_from_the_finished_jobs(database: str) -> None:
    import migrations

    with psycopg.connect(database, autocommit=True) as conn:
        _insert(conn, "ten_a", 1, 4)
        _finish(conn, 1, 4, run_seconds=3.0)
    migrations.downgrade(database, "0012_tenant_type_index")
    migrations.upgrade(database)
    with psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM gpu_seconds_deltas").fetchone() == (0,)
        assert _recent(database) == _truth(conn) == {"ten_a": (12.0, 4)}
