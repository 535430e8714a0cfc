"""`python -m bench.scale` and `python -m bench.soak` run small, so the scripts cannot rot.

Their figures are for docs/benchmarks.md; here only what they must get right is asserted: every row of the
scale table timed on both databases (or said to be missing from this tree), both databases holding the jobs
asked for and dropped at the end, and the soak's jobs all accepted, none lost, none duplicated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg
import pytest

from gpujobs.harness.databases import postgres_maintenance_conninfo, postgres_unavailable_reason
from tests.bench_runs import run_bench as _run


def test_scale_loads_both_databases_times_every_row_and_drops_them(tmp_path: Path) -> None:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)  # the benchmark is for PostgreSQL only, as it says
    name = f"gpujobs_scaletest_{os.getpid()}"
    out = tmp_path / "scale.json"
    done = _run(
        "bench.scale",
        *("--jobs", "2000", "--tenants", "20", "--baseline-jobs", "200", "--runs", "2", "--warmup", "1"),
        *("--database", name, "--drop", "--json", str(out)),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["sizes"] == {
        "small": {"database": f"{name}_base", "jobs": 200},
        "large": {"database": name, "jobs": 2000},
    }
    rows = {row["name"]: row for row in figures["rows"]}
    assert len(rows) == 17, sorted(rows)
    for wanted in ("POST /v1/jobs (submit)", "GET /metrics/cluster", "admin overview", "reconcile pass"):
        assert rows[wanted]["small_ms"] > 0 and rows[wanted]["large_ms"] > 0, rows[wanted]
    for row in rows.values():  # every row timed on both
        assert row["small_ms"] > 0 and row["large_ms"] > 0, row
        assert row["ratio"] == pytest.approx(row["large_ms"] / row["small_ms"])
    assert "ratio" in done.stdout and "load average" in done.stdout
    conninfo = postgres_maintenance_conninfo()
    assert conninfo is not None
    with psycopg.connect(conninfo) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{name}%",)).fetchall()
    assert left == []


def test_scale_refuses_bad_options() -> None:
    for args in (
        ["--jobs", "0"],
        ["--runs", "0"],
        ["--retention-batch", "0"],
        ["--database", "Robert'); DROP"],
        ["--database", "gpujobs"],
        ["--tenants", "many"],
    ):
        done = _run("bench.scale", *args, timeout=60)
        assert done.returncode == 2, (args, done.stderr[-1000:])
        assert "error:" in done.stderr


def test_soak_loses_and_duplicates_no_job(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = _run("bench.soak", "--jobs", "100", "--rate", "25", "--windows", "4", "--json", str(out), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["accepted"] == 100 and figures["refused"] == 0, figures
    assert figures["lost"] == 0 and figures["duplicated"] == 0 and figures["unfinished"] == 0, figures
    assert figures["statuses"] == {"succeeded": 100}
    assert [w["submitted"] for w in figures["windows"]] == [25, 25, 25, 25]
    assert all(w["p99_ms"] >= w["p50_ms"] > 0 for w in figures["windows"])
    assert any(w["api_rss_mb"] and w["worker_rss_mb"] for w in figures["windows"])  # RSS was sampled
    assert "lost 0" in done.stdout and "duplicated 0" in done.stdout


def test_metrics_overhead_runs_small() -> None:
    """`python -m bench.metrics_overhead` (docs/benchmarks.md, "Metrics instrumentation") at a small size."""
    done = _run("bench.metrics_overhead", "--requests", "50", "--jobs", "200", "--rounds", "1", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for wanted in ("load average", "with the hook", "worker recording, per job", "of 10.57 ms"):
        assert wanted in done.stdout, done.stdout
