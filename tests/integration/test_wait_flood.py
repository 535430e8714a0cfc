"""A flood of waits costs other tenants nothing (issue 13, items 2 and 12).

One `gpujobs api --workers 1` (gunicorn, gevent) of its own, with no worker: 500 concurrent
`Prefer: wait=15` reads of queued jobs (10 tenants, 50 waits each: under the default caps) park
for their 15 s, while another tenant's submits and `/healthz` keep being answered. If a wait held a
thread or a database connection (the pool holds 30), the submits would queue behind the waits and
answer only after their 15 s.

What is asserted is correctness and structure, with generous bounds: every wait answers 200
`queued` after its full 15 s, every submit during the flood answers 202 within 2 s (not behind a
15 s wait), every `/healthz` 200 within 0.5 s. How much the flood costs a submit is measured, not
asserted: `python -m bench.wait_flood` (docs/benchmarks.md). This test prints one round's figures.

The flood client (asyncio streams on one thread of this unpatched process) is bench/lib/flood.py.
"""

from __future__ import annotations

from typing import Any

import requests

from bench.lib.flood import enough_open_files, flood_round, queue_jobs, submit_latencies
from tests.integration.private_api import private_api

WAITS = 500
TENANTS = 10
JOBS_PER_TENANT = 5
WAIT_SECONDS = 15
SAMPLES = 60  # submits per phase
HEALTH_PROBES = 20
SUBMIT_BOUND = 2.0  # seconds: far under the 15 s a submit queued behind a wait would take
HEALTH_BOUND = 0.5


def test_500_waits_leave_another_tenants_submits_and_healthz_answered(tmp_path: Any) -> None:
    enough_open_files(WAITS * 2 + 256)
    with private_api(tmp_path, workers=1) as api:
        flood_keys = [api.key(f"flood {i}").secret for i in range(TENANTS)]
        other = api.key("other tenant").secret
        client = requests.Session()
        jobs = queue_jobs(client, api.base_url, flood_keys, JOBS_PER_TENANT)
        targets = [(key, jobs[key][i % JOBS_PER_TENANT]) for key in flood_keys for i in range(WAITS // TENANTS)]
        submit_latencies(client, api.base_url, other, 5)  # warm up
        print(f"\nwait flood: {WAITS} concurrent Prefer: wait={WAIT_SECONDS} on one gevent process, {TENANTS} tenants")
        measured = flood_round(
            api.base_url, api.process.pid, client, other, targets, WAIT_SECONDS, SAMPLES, HEALTH_PROBES
        )
        print(measured.report())

    assert not measured.flood.problems(), measured.flood.problems()
    assert len(measured.flood.results) == WAITS
    # The submits and probes were all measured while every wait was parked.
    assert measured.measured_by < WAIT_SECONDS - 2, f"measured by {measured.measured_by:.1f}s"
    assert len(measured.during) == SAMPLES and max(measured.during) < SUBMIT_BOUND, (
        f"a submit during the flood took {max(measured.during):.2f}s (a wait held what it needed?)"
    )
    assert len(measured.during_health) == HEALTH_PROBES and max(measured.during_health) < HEALTH_BOUND, (
        f"/healthz during the flood took {max(measured.during_health):.2f}s"
    )


def test_the_benchmark_runs_and_reports_the_ratio(tmp_path: Any) -> None:
    """`python -m bench.wait_flood` (bench/README.md), small: it starts its own deployment, floods it, checks
    the waits' answers itself, reports the figures and stops everything (exit 0)."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "flood.json"
    args = ["--rounds", "1", "--waits", "40", "--tenants", "2", "--wait-seconds", "3", "--samples", "5"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.wait_flood", *args, "--probes", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env={k: v for k, v in os.environ.items() if not k.startswith("GPUJOBS_")},  # as from a shell: its own
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "during/idle medians" in done.stdout, done.stdout
    figures = json.loads(out.read_text())
    assert figures["waits"] == 40 and len(figures["rounds"]) == 1 and figures["ratio"] > 0
    assert len(figures["submit_during"]) == 5
    assert all(3 - 0.5 <= s < 3 + 20 for s in figures["rounds"][0]["waits_answered_s"])
