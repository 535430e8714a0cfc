"""`python -m bench.statements` runs small, so the script cannot rot, and the statements per job stay cut.

The counts do not depend on the machine's load (they are counts, not times), so they are asserted: on
PostgreSQL a submit (authentication, the quota check, the insert, a dispatch pass that sends the job) is
7 statements, a run 6 and a read of the finished job 2 (docs/benchmarks.md, "Statements per job"). A change
that adds a round trip to these paths shows here first.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench_runs import run_bench


def test_statements_per_job_are_counted_and_stay_cut(tmp_path: Path) -> None:
    out = tmp_path / "statements.json"
    done = run_bench("bench.statements", "--jobs", "3", "--json", str(out), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["outcomes"] == {"succeeded": 3}
    assert set(figures["per_job"]) == {"submit", "run", "read"}
    assert "statements per job" in done.stdout and "pool checkouts" in done.stdout
    if figures["database"].startswith("PostgreSQL"):  # SQLite has no advisory lock and two INSERTs per submit
        # The live workers are read at most once a second per process (worker/dispatcher.py): on a slow
        # machine a pass may read them again, which is not a statement of the job's own.
        cached = {phase: figures["by_kind"][phase].get("SELECT workers", 0) for phase in figures["per_job"]}
        per_job = {phase: round(count - cached[phase], 2) for phase, count in figures["per_job"].items()}
        assert per_job == {"submit": 7, "run": 6, "read": 2}, figures["by_kind"]
        assert figures["checkouts_per_job"] == {"submit": 2, "run": 4, "read": 1}
