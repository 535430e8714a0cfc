"""Fair share: how long another tenant's job (and a priority-9 job of the busy tenant) waits behind a backlog.

Run from the repository root (nothing to configure on this machine)::

    . .venv/bin/activate && python -m bench.fair_share            # about 2 minutes with the defaults

One ``gpujobs api`` and one ``gpujobs worker --queues gpu --concurrency 2`` on a fresh deployment
(``bench.deployment``), with the service's default scheduling settings (``GPUJOBS_DISPATCH_BUFFER``,
``GPUJOBS_FAIR_SHARE_WINDOW_SECONDS``). Tenant A submits ``--backlog`` diagnostic jobs of ``--seconds``
each; once two of them run, ``--rounds`` times:

1. a new tenant B submits one job of the same length;
2. A submits one job of the same length with ``priority: 9``;

each waits for its job to start. Printed: each start delay (``started_at - created_at`` as the API
reports it, ``metrics.queue_seconds``) in seconds and in job durations, their medians, A's backlog
left, and what FIFO (the broker's order before the scheduler) would have made B wait: the jobs ahead
of it × the job's length / the two slots (computed, not run: minutes per round). The load average
before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import requests

from bench.deployment import Deployment, run
from bench.lib.report import log, machine
from bench.lib.stats import median

SLOTS = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backlog", type=int, default=1000, help="A's queued jobs (default 1000)")
    parser.add_argument("--seconds", type=float, default=0.5, help="length of every job (default 0.5)")
    parser.add_argument("--rounds", type=int, default=5, help="B jobs and priority-9 jobs measured (default 5)")
    parser.add_argument("--buffer", type=int, help="GPUJOBS_DISPATCH_BUFFER (default: the setting's default)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the children's logs")
    args = parser.parse_args(argv)
    if args.backlog < 10 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--backlog must be at least 10, --rounds at least 1, --seconds positive")
    command = " ".join(["python -m bench.fair_share", *(argv if argv is not None else sys.argv[1:])])
    return run("fair-share", lambda deployment: measure(args, command, deployment), report, args.json, args.keep_logs)


def measure(args: argparse.Namespace, command: str, deployment: Deployment) -> dict[str, Any]:
    load_before = os.getloadavg()
    deployment.start_services()
    # Tenant A's backlog is 1,000 submits from one key as fast as they go: the per-key request limit (6,000 a
    # minute by default) would only slow the set-up, not change what is measured.
    settings = {"GPUJOBS_RATE_LIMIT_PER_MINUTE": "0"}
    if args.buffer is not None:
        settings["GPUJOBS_DISPATCH_BUFFER"] = str(args.buffer)
    key_a = deployment.prepare("gpujobs-bench-fair-share", settings, "tenant A")
    assert deployment.stack is not None
    _, base_url = deployment.start_api()
    client = requests.Session()
    job = {"type": "diagnostic", "input": {"sleep_seconds": args.seconds}}
    started = time.monotonic()
    for _ in range(args.backlog):
        post(client, base_url, key_a, job)
    log(f"A queued {args.backlog} jobs in {time.monotonic() - started:.1f} s")
    deployment.stack.start_worker("gpu", concurrency=SLOTS, name="bench-fair-share")
    while running(deployment.database_url) < SLOTS:  # the worker took its first jobs: the backlog is draining
        time.sleep(0.05)

    rounds: list[dict[str, Any]] = []
    for number in range(1, args.rounds + 1):
        key_b = new_admin_key(deployment.database_url, f"tenant B{number}")
        other = wait_started(client, base_url, key_b, post(client, base_url, key_b, job))
        urgent = wait_started(client, base_url, key_a, post(client, base_url, key_a, {**job, "priority": 9}))
        left = queued(deployment.database_url)
        rounds.append({"b_delay_s": other, "priority_delay_s": urgent, "a_queued_after": left})
        log(f"round {number}: B started after {other:.2f} s, A's priority-9 job after {urgent:.2f} s; {left} queued")
    return {
        "command": command,
        "machine": machine(),
        "services": f"{deployment.database_label}; {deployment.broker_label}; {deployment.s3_label}",
        "backlog": args.backlog,
        "job_seconds": args.seconds,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rounds": rounds,
        "run_s": run_time(deployment.database_url),
    }


def run_time(database_url: str) -> float:
    """The median time a job of the backlog actually ran (claim to finish: the sleep, storing its artifact)."""
    from sqlalchemy import select

    from db.models import Job
    from db.session import session_scope

    with session_scope(database_url) as session:
        spans = session.execute(select(Job.started_at, Job.finished_at).where(Job.status == "succeeded")).all()
    return median([(finished - started).total_seconds() for started, finished in spans])


def post(client: requests.Session, base_url: str, key: str, body: dict[str, Any]) -> str:
    response = client.post(f"{base_url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    response.raise_for_status()
    return str(response.json()["id"])


def wait_started(client: requests.Session, base_url: str, key: str, job_id: str, timeout: float = 600.0) -> float:
    """Poll the job until it started; its ``metrics.queue_seconds`` (created → started, the database's clock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"{base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
        if job["metrics"]["queue_seconds"] is not None:
            return float(job["metrics"]["queue_seconds"])
        time.sleep(0.02)
    raise RuntimeError(f"job {job_id} did not start within {timeout:g} s")


def new_admin_key(database_url: str, name: str) -> str:
    """An admin key (diagnostic jobs need one) in a tenant of its own."""
    from db.keys import create_key
    from db.models import Role
    from db.session import session_scope

    with session_scope(database_url) as session:
        return create_key(session, name, Role.ADMIN)[1]


def running(database_url: str) -> int:
    return count(database_url, "running")


def queued(database_url: str) -> int:
    return count(database_url, "queued")


def count(database_url: str, status: str) -> int:
    from sqlalchemy import func, select

    from db.models import Job
    from db.session import session_scope

    with session_scope(database_url) as session:
        return int(session.execute(select(func.count()).select_from(Job).where(Job.status == status)).scalar_one())


def report(results: dict[str, Any]) -> None:
    seconds = results["job_seconds"]
    rounds = results["rounds"]
    print(f"\nFair share: tenant A holds {results['backlog']} queued {seconds:g} s jobs, one worker with {SLOTS} slots")
    print(f"command: {results['command']}\nmachine: {results['machine']}\nservices: {results['services']}")
    print(
        "load average (1, 5, 15 min): before "
        + ", ".join(f"{x:.2f}" for x in results["load_before"])
        + "; after "
        + ", ".join(f"{x:.2f}" for x in results["load_after"])
    )
    print("\n| round | B's start delay | in job durations | A's priority-9 delay | in job durations | A queued after |")
    print("|---|---:|---:|---:|---:|---:|")
    for number, r in enumerate(rounds, 1):
        b, p = r["b_delay_s"], r["priority_delay_s"]
        print(f"| {number} | {b:.2f} s | {b / seconds:.2f} | {p:.2f} s | {p / seconds:.2f} | {r['a_queued_after']} |")
    b = median([r["b_delay_s"] for r in rounds])
    p = median([r["priority_delay_s"] for r in rounds])
    fifo = rounds[0]["a_queued_after"] * seconds / SLOTS
    run_s = results["run_s"]
    print(
        f"\nmedians: B {b:.2f} s ({b / seconds:.2f} job durations), A's priority 9 {p:.2f} s "
        f"({p / seconds:.2f} job durations); FIFO would have made B wait about {fifo:.0f} s "
        f"({fifo / seconds:.0f} job durations: the backlog ahead of it / {SLOTS} slots, computed)"
    )
    print(
        f"a job of the backlog actually ran {run_s:.3f} s (median, claim to finish): in those durations, "
        f"B {b / run_s:.2f}, A's priority 9 {p / run_s:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
