"""Soak: diagnostic jobs at a steady rate across tenants for a long while; nothing lost, nothing grows.

    python -m bench.soak                         # 20,000 jobs at 20/s over 10 tenants (about 17 minutes)
    python -m bench.soak --jobs 2000             # the short run (about 2 minutes)

A real stack on the deployment every benchmark uses (``bench/deployment.py``: a fresh PostgreSQL database,
an embedded Redis and S3 server): ``gpujobs api`` (its default gunicorn gevent workers), one
``gpujobs worker --queues gpu,maintenance`` (default concurrency) and ``gpujobs beat`` (the reconciler), with
the service's default settings (the per-key rate limit on). ``--tenants`` admin keys, each its own tenant
(the diagnostic job is for admin keys), submit ``diagnostic`` jobs (no sleep, one step) in turn, open loop:
job ``i`` is sent at ``i / --rate`` seconds by a small pool of client threads, whatever the answers' times.

At the end, once every job has finished (or ``--drain-timeout`` passed), the database is asked:
- lost: a job the API accepted that did not succeed, or that the database does not hold;
- duplicated: a job claimed more than once, or with more than one ``succeeded`` event, or a job in the
  database that no submission returned (each finished job must have exactly one succeeded attempt);
- unfinished: a job still queued or running when the drain timed out (the stack fell behind the rate);
and the client's side: submissions that got no 201/202.

Every ``--sample`` seconds the resident memory (RSS) of the API's and the worker's process trees is read
(psutil). The run is cut into ``--windows`` windows of submission time; per window: p50 and p99 submit
latency and the median RSS of each tree. After the warm-up (the first fifth of the windows), RSS must stay
within 10 % (max / min of the window medians) and p99 stable. It prints the table, the verdicts and the load
average; ``--json`` writes the figures. Exit status 1 when a job was lost, duplicated or unfinished.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.deployment import Deployment, run
from bench.lib.client import LeanSession
from bench.lib.report import log, machine
from bench.lib.stats import percentile

RSS_FLAT = 0.10  # max / min of the window medians after warm-up
FINISHED = ("succeeded", "failed", "canceled")


@dataclass
class Submission:
    index: int
    tenant: int
    sent_at: float  # seconds since the start
    latency: float = 0.0
    status: int = 0
    job_id: str | None = None
    error: str | None = None


@dataclass
class Samples:
    times: list[float] = field(default_factory=list)
    api: list[int] = field(default_factory=list)
    worker: list[int] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=20.0, help="submissions per second (all tenants)")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4, help="client threads sending on the schedule")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--sample", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rate <= 0 or args.tenants < 1 or args.clients < 1 or args.windows < 1:
        parser.error("--jobs, --rate, --tenants, --clients and --windows must be positive")
    verdict: dict[str, bool] = {}

    def measure(deployment: Deployment) -> dict[str, Any]:
        results = soak(args, deployment)
        verdict["intact"] = results["lost"] == 0 and results["duplicated"] == 0 and results["unfinished"] == 0
        return results

    status = run("soak", measure, report, args.json, args.keep_logs)
    return status or (0 if verdict.get("intact") else 1)


def soak(args: argparse.Namespace, deployment: Deployment) -> dict[str, Any]:
    load_before = os.getloadavg()
    deployment.start_services()
    # The service's defaults: the deployment turns the per-key rate limit off, a user's deployment has it on.
    deployment.prepare("gpujobs-soak", {"GPUJOBS_RATE_LIMIT_PER_MINUTE": "6000"}, "soak")
    keys = tenant_keys(deployment.database_url, args.tenants)
    assert deployment.stack is not None
    api, base = deployment.start_api()
    worker = deployment.stack.start_worker(queues="gpu,maintenance", name="soak-worker")
    deployment.stack.start_beat()
    log(f"stack up: API {base}, worker, beat; {args.jobs:,} jobs at {args.rate:g}/s over {args.tenants} tenants")

    samples, stop = Samples(), threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(api.pid, worker.pid, samples, stop, args.sample))
    started = time.monotonic()
    sampler.start()
    try:
        submissions = submit_all(args, base, keys, started)
        log(f"submitted in {time.monotonic() - started:.0f} s; waiting for the jobs to finish")
        drained = drain(deployment.database_url, args.drain_timeout)
    finally:
        stop.set()
        sampler.join()
    check = check_jobs(deployment.database_url, submissions)
    windows = per_window(submissions, samples, args.windows, time_span=args.jobs / args.rate)
    return {
        "machine": machine(),
        "jobs": args.jobs,
        "rate": args.rate,
        "tenants": args.tenants,
        "drained_seconds": drained,
        "load_average": {"start": load_before, "end": os.getloadavg()},
        **check,
        "windows": windows,
        **flatness(windows),
    }


def tenant_keys(database_url: str, count: int) -> list[str]:
    from db.keys import create_key
    from db.models import Role
    from db.session import dispose_engines, session_scope

    with session_scope(database_url) as session:
        keys = [create_key(session, f"soak tenant {n}", Role.ADMIN)[1] for n in range(count)]
    dispose_engines()
    return keys


# --- the load ------------------------------------------------------------------------------------


def submit_all(args: argparse.Namespace, base: str, keys: list[str], started: float) -> list[Submission]:
    local = threading.local()
    submissions = [Submission(i, i % len(keys), i / args.rate) for i in range(args.jobs)]

    def send(item: Submission) -> None:
        delay = started + item.sent_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = LeanSession()
        headers = {"Authorization": f"Bearer {keys[item.tenant]}", "Idempotency-Key": uuid.uuid4().hex}
        began = time.perf_counter()
        try:
            response = session.post(f"{base}/v1/jobs", {"type": "diagnostic", "input": {"steps": 1}}, headers)
            item.status = response.status_code
            if response.status_code in (201, 202):
                item.job_id = response.json()["id"]
            else:
                item.error = response.text[:200]
        except Exception as exc:  # the figures say how many; the run goes on
            item.error = f"{type(exc).__name__}: {exc}"
        item.latency = time.perf_counter() - began
        if item.index and item.index % max(1, args.jobs // 10) == 0:
            log(f"{item.index:,} submitted")

    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(send, submissions))
    return submissions


def sample_rss(api_pid: int, worker_pid: int, samples: Samples, stop: threading.Event, every: float) -> None:
    began = time.monotonic()
    while not stop.wait(every):
        samples.times.append(time.monotonic() - began)
        samples.api.append(tree_rss(api_pid))
        samples.worker.append(tree_rss(worker_pid))


def tree_rss(pid: int) -> int:
    """Resident bytes of the process and its children (gunicorn's workers, Celery's pool)."""
    try:
        root = psutil.Process(pid)
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total
    except psutil.NoSuchProcess:
        return 0


def drain(database_url: str, timeout: float) -> float:
    """Seconds until no job is queued or running (or the timeout)."""
    import psycopg

    began = time.monotonic()
    with psycopg.connect(database_url, autocommit=True) as conn:
        while time.monotonic() - began < timeout:
            row = conn.execute("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()
            if row and row[0] == 0:
                break
            time.sleep(0.5)
    return time.monotonic() - began


# --- the verdicts --------------------------------------------------------------------------------


UNFINISHED = ("queued", "running")


def check_jobs(database_url: str, submissions: list[Submission]) -> dict[str, Any]:
    """Lost and duplicated jobs, as the database tells them, and the client's refused submissions."""
    import psycopg

    accepted = {s.job_id for s in submissions if s.job_id}
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """
            SELECT j.id, j.status, j.attempts,
                   count(*) FILTER (WHERE e.kind = 'claimed'),
                   count(*) FILTER (WHERE e.kind = 'succeeded')
            FROM jobs j LEFT JOIN job_events e ON e.job_id = j.id
            WHERE j.type = 'diagnostic'
            GROUP BY j.id, j.status, j.attempts
            """
        ).fetchall()
    found = {job_id: (status, attempts, claims, wins) for job_id, status, attempts, claims, wins in rows}
    # Still queued or running when the drain timed out: not lost (the database holds them and they will
    # run), but the stack did not keep up with the rate; reported on their own.
    unfinished = sorted(job_id for job_id in accepted if job_id in found and found[job_id][0] in UNFINISHED)
    lost = sorted(
        job_id for job_id in accepted if job_id not in found or found[job_id][0] not in ("succeeded", *UNFINISHED)
    )
    duplicated = sorted(
        job_id
        for job_id, (status, attempts, claims, wins) in found.items()
        if claims > 1 or wins > 1 or (status not in UNFINISHED and (attempts != 1 or claims != 1 or wins != 1))
    )
    unknown = sorted(set(found) - accepted)
    refused = [s for s in submissions if s.job_id is None]
    return {
        "accepted": len(accepted),
        "refused": len(refused),
        "refused_examples": [f"{s.status} {s.error}" for s in refused[:5]],
        "lost": len(lost),
        "lost_examples": lost[:5],
        "unfinished": len(unfinished),
        "unfinished_examples": unfinished[:5],
        "duplicated": len(duplicated) + len(unknown),
        "duplicated_examples": (duplicated + unknown)[:5],
        "statuses": {s: sum(1 for v in found.values() if v[0] == s) for s in sorted({v[0] for v in found.values()})},
    }


def per_window(submissions: list[Submission], samples: Samples, count: int, time_span: float) -> list[dict[str, Any]]:
    width = time_span / count
    windows = []
    for n in range(count):
        start, end = n * width, (n + 1) * width
        latencies = [s.latency * 1000 for s in submissions if start <= s.sent_at < end and s.job_id]
        api = [v for t, v in zip(samples.times, samples.api, strict=True) if start <= t < end]
        worker = [v for t, v in zip(samples.times, samples.worker, strict=True) if start <= t < end]
        windows.append(
            {
                "window": n + 1,
                "from_s": start,
                "submitted": len(latencies),
                "p50_ms": statistics.median(latencies) if latencies else None,
                "p99_ms": percentile(latencies, 99) if latencies else None,
                "api_rss_mb": statistics.median(api) / 2**20 if api else None,
                "worker_rss_mb": statistics.median(worker) / 2**20 if worker else None,
            }
        )
    return windows


def flatness(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """After the warm-up (the first fifth of the windows): RSS spread (max / min − 1) and the p99 spread."""
    settled = windows[max(1, len(windows) // 5) :] or windows
    found: dict[str, Any] = {}
    for key in ("api_rss_mb", "worker_rss_mb", "p99_ms"):
        values = [w[key] for w in settled if w[key]]
        found[f"{key}_spread"] = (max(values) / min(values) - 1) if values else None
    found["rss_flat"] = all(
        found[f"{key}_spread"] is not None and found[f"{key}_spread"] <= RSS_FLAT
        for key in ("api_rss_mb", "worker_rss_mb")
    )
    return found


def report(results: dict[str, Any]) -> None:
    print(f"soak: {results['jobs']:,} diagnostic jobs at {results['rate']:g}/s over {results['tenants']} tenants")
    print(f"{'window':>6} {'from':>7} {'sent':>6} {'p50 ms':>8} {'p99 ms':>8} {'API RSS MB':>11} {'worker RSS MB':>14}")
    for w in results["windows"]:
        cells = [_cell(w[key], width) for key, width in (("p50_ms", 8), ("p99_ms", 8))]
        cells += [_cell(w["api_rss_mb"], 11), _cell(w["worker_rss_mb"], 14)]
        print(f"{w['window']:>6} {w['from_s']:>6.0f}s {w['submitted']:>6} {' '.join(cells)}")
    print(
        f"accepted {results['accepted']:,}, refused {results['refused']} {results['refused_examples']}; "
        f"lost {results['lost']} {results['lost_examples']}; duplicated {results['duplicated']} "
        f"{results['duplicated_examples']}; unfinished at the drain's timeout {results['unfinished']}; "
        f"statuses {results['statuses']}; drained "
        f"{results['drained_seconds']:.0f} s after the last submission"
    )
    spreads = ", ".join(
        f"{key} {results[f'{key}_spread'] * 100:.1f} %" if results[f"{key}_spread"] is not None else f"{key} n/a"
        for key in ("api_rss_mb", "worker_rss_mb", "p99_ms")
    )
    flat = "flat" if results["rss_flat"] else "NOT flat"
    print(f"after warm-up, max/min - 1: {spreads}; RSS {flat} (aim: within {RSS_FLAT:.0%})")
    start, end = results["load_average"]["start"], results["load_average"]["end"]
    print(f"load average: {start[0]:.2f} at the start, {end[0]:.2f} at the end; {results['machine']}")


def _cell(value: float | None, width: int) -> str:
    return f"{value:>{width}.1f}" if value is not None else f"{'–':>{width}}"


if __name__ == "__main__":
    sys.exit(main())
