"""`python -m bench.queue_overhead` runs small with its profiler, and `bench.profile_report` splits what it
recorded: neither script can rot, and the report's parts still name the frames the servers run.

Times are not asserted (they are the benchmark's, on a quiet machine: docs/benchmarks.md); the run's
shape is: every phase's figures for the three systems, no errors, and py-spy recordings in which the
named parts (the insert, the dispatch passes, the claim, the S3 put, the success…) hold samples.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.bench_runs import run_bench

SYSTEMS = {"bare Celery", "hand-written", "gpujobs"}


def test_the_queue_overhead_benchmark_runs_small_and_its_profile_splits_into_the_named_parts(tmp_path: Path) -> None:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        pytest.fail("py-spy is a dependency of the project (pyproject.toml): install it with `make install`")
    figures_path, profiles = tmp_path / "qo.json", tmp_path / "profiles"
    done = run_bench(
        "bench.queue_overhead",
        *("--submissions", "40", "--latency-samples", "5", "--load-samples", "100", "--rounds", "1"),
        *("--warmup", "5", "--json", str(figures_path), "--py-spy", py_spy, "--profile-dir", str(profiles)),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(figures_path.read_text())
    for phase in ("throughput", "load"):
        assert set(figures[phase]) == SYSTEMS, (phase, figures[phase])
    modes = {mode.split(":")[0] for mode in figures["latency"]}  # "gpujobs: POST Prefer: wait", …
    assert modes == SYSTEMS and all(m["errors"] == 0 for m in figures["latency"].values()), figures["latency"]
    for system in SYSTEMS:
        assert figures["load"][system]["errors"] == 0 and figures["load"][system]["n"] == 100
    assert figures["load"]["gpujobs"]["cpu_ms_per_op"]["gpujobs worker"] > 0

    report = run_bench("bench.profile_report", str(profiles), "--json", str(figures_path), timeout=60)
    assert report.returncode == 0, report.stderr[-3000:]
    from bench import profile_report

    splits = {(s.system, s.server): s for s in profile_report.read(profiles, "c")}
    assert set(splits) == set(profile_report.PARTS), sorted(splits)
    expected = {
        ("gpujobs", "api"): ["job insert (files, job, event), commit", "dispatch pass after the submit"],
        ("gpujobs", "worker"): [
            "claim (lease, event)",
            "S3 put (with Content-MD5)",
            "success (job, artifact rows, events), commit",
        ],
        ("hand-written", "api"): ["row insert, commit", "Celery send (.delay)"],
        ("hand-written", "worker"): ["S3 put", "row update, commit"],
    }
    for key, parts in expected.items():
        split = splits[key]
        assert split.samples > 0, key
        for part in parts:
            assert split.parts.get(part, 0) > 0, (key, part, split.parts)
        assert f"{key[0]} {key[1]}, phase (c)" in report.stdout and "ms of CPU per job" in report.stdout
