"""Metrics overhead: the CPU the Prometheus instrumentation adds per request and per job.

Run from the repository root::

    . .venv/bin/activate && python -m bench.metrics_overhead

Measured in this process, CPU time (``time.process_time``), medians over ``--rounds``:

- **per request (API)**: a Flask app with one trivial route, ``--requests`` requests through its test
  client, with and without ``api.instruments.register`` (the request hook: a counter and a histogram
  per request), in one run and interleaved round by round; the difference is what the hook adds, the
  ratio is against the bare request measured in the same run. In multiprocess mode (as under
  ``gpujobs api``: ``PROMETHEUS_MULTIPROC_DIR`` set before prometheus_client is imported, values in
  memory-mapped files), which is the costlier of the two.
- **per job (worker)**: what ``worker.runner`` and the webhook sender record for one job (a queue-wait
  observation, a finished counter and a run-time observation, a webhook attempt), in the worker's
  single-process mode.

A job costs the API one submit (one request) and the worker one claim-to-finish; the sum of the two
figures is set against the CPU per job that ``python -m bench.queue_overhead`` measures for the
whole system (``--per-job-cpu-ms``, default: the API + worker figure of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from bench.lib.stats import median

API_CHILD = """
import os, sys, time, json
from flask import Flask
from api import instruments
def app(hooked):
    app = Flask("bench")
    if hooked:
        instruments.register(app)
    @app.get("/v1/things/<thing_id>")
    def thing(thing_id):
        return thing_id
    return app.test_client()
bare, hooked = app(False), app(True)
requests, rounds = int(sys.argv[1]), int(sys.argv[2])
times = {"bare": [], "hooked": []}
for client in (bare, hooked):
    for _ in range(200):
        client.get("/v1/things/warm")
for _ in range(rounds):
    for name, client in (("bare", bare), ("hooked", hooked)):
        started = time.process_time()
        for _ in range(requests):
            client.get("/v1/things/thing_1")
        times[name].append((time.process_time() - started) / requests)
print(json.dumps(times))
"""


def per_request(requests: int, rounds: int) -> tuple[float, float]:
    """(bare, hooked) seconds of CPU per request, medians, in a child in multiprocess mode."""
    import json

    with tempfile.TemporaryDirectory(prefix="gpujobs-bench-metrics-") as folder:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": folder}
        out = subprocess.run(
            [sys.executable, "-c", API_CHILD, str(requests), str(rounds)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    times = json.loads(out.strip().splitlines()[-1])
    return median(times["bare"]), median(times["hooked"])


def per_job(jobs: int, rounds: int) -> float:
    """Seconds of CPU per job of the worker's recording (single-process mode, this process)."""
    from worker import metrics

    samples = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(jobs):
            metrics.QUEUE_WAIT.labels("diagnostic").observe(0.02)
            metrics.job_finished("diagnostic", "gpu", "succeeded", "", 0.3)
            metrics.webhook_attempt(200)
        samples.append((time.process_time() - started) / jobs)
    return median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and app (default 2000)")
    parser.add_argument("--jobs", type=int, default=20000, help="jobs per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; figures are medians (default 7)")
    parser.add_argument(
        "--per-job-cpu-ms",
        type=float,
        default=10.57,
        help="CPU per job of the whole system, API + worker, from bench.queue_overhead (default: docs/benchmarks.md)",
    )
    args = parser.parse_args()
    bare, hooked = per_request(args.requests, args.rounds)
    worker = per_job(args.jobs, args.rounds)
    added_api = hooked - bare
    total = added_api + worker
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"API request, bare Flask:      {bare * 1e6:8.1f} µs CPU (median of {args.rounds})")
    print(
        f"API request, with the hook:   {hooked * 1e6:8.1f} µs CPU  (+{added_api * 1e6:.1f} µs, {hooked / bare:.3f}×)"
    )
    print(f"worker recording, per job:    {worker * 1e6:8.1f} µs CPU")
    print(
        f"per job, API + worker:        {total * 1e6:8.1f} µs CPU = {100 * total / (args.per_job_cpu_ms / 1e3):.2f}% "
        f"of {args.per_job_cpu_ms:g} ms (bench.queue_overhead's CPU per job)"
    )


if __name__ == "__main__":
    main()
