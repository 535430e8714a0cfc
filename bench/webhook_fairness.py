"""Webhook fairness: how late another tenant's webhook is while one tenant's receiver is slow.

Run from the repository root (nothing to configure on this machine)::

    . .venv/bin/activate && python -m bench.webhook_fairness        # about 3 minutes with the defaults

The deployment of ``gpujobs up``: one ``gpujobs api``, one worker serving every queue (gpu, train,
webhooks, maintenance) with the default concurrency, and beat, on a fresh deployment
(``bench.deployment``), with webhooks allowed to reach loopback. A receiver in this process (the
tests' ``webhook_receiver``) answers each path as scripted. Each round has two new tenants:

1. idle (the baseline): tenant B submits one diagnostic job whose webhook answers at once; B's
   delay is the time from the job's ``finished_at`` to its ``completed`` webhook's arrival;
2. behind a slow receiver: tenant A submits ``--slow-jobs`` jobs whose receiver answers after
   ``--slow-seconds``; once they have all succeeded and A's first attempts are in flight, B submits
   one job as in 1 and its delay is measured the same way (and from its submit, as the issue did);
3. the round waits until A's backlog is delivered, so rounds do not overlap.

Printed: each round's delays, their medians, the ratio behind/idle, the most requests at once at
A's receiver (the per-endpoint limit), the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from bench.deployment import Deployment, run
from bench.lib.report import log, machine
from bench.lib.stats import median
from tests.integration.webhook_receiver import Receiver, Reply


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--slow-jobs", type=int, default=20, help="tenant A's jobs per round (default 20)")
    parser.add_argument("--slow-seconds", type=float, default=8.0, help="A's receiver's answer time (default 8)")
    parser.add_argument(
        "--code",
        type=Path,
        help="run the API and the worker from this checkout instead (another build, e.g. one before this change; "
        "the schema is this checkout's)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the children's logs")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.slow_jobs < 1 or args.slow_seconds <= 0:
        parser.error("--rounds and --slow-jobs must be at least 1, --slow-seconds above 0")
    command = " ".join(["python -m bench.webhook_fairness", *(argv if argv is not None else sys.argv[1:])])
    return run(
        "webhook-fairness", lambda deployment: measure(args, command, deployment), report, args.json, args.keep_logs
    )


def measure(args: argparse.Namespace, command: str, deployment: Deployment) -> dict[str, Any]:
    from db.settings import Settings
    from gpujobs.up import UP_QUEUES

    load_before = os.getloadavg()
    deployment.start_services()
    deployment.prepare(
        "gpujobs-bench-webhook-fairness",
        {
            "GPUJOBS_WEBHOOK_ALLOW_PRIVATE": "true",
            "GPUJOBS_WEBHOOK_TIMEOUT_SECONDS": str(max(args.slow_seconds + 5, 10)),
        },
        "webhook fairness",
    )
    assert deployment.stack is not None
    if args.code:
        code = str(args.code.resolve())
        deployment.stack.env["PYTHONPATH"] = code + os.pathsep + deployment.stack.env.get("PYTHONPATH", "")
        deployment.stack.cwd = args.code.resolve()
    _, base_url = deployment.stack.start_api(workers=1)
    deployment.stack.start_worker(UP_QUEUES, concurrency=Settings.model_fields["worker_concurrency"].default)
    deployment.stack.start_beat()
    receiver = Receiver()
    deployment.at_stop(receiver.stop)
    client = requests.Session()
    limit = Settings.model_fields["webhook_endpoint_concurrency"].default
    log(f"{args.rounds} rounds: {args.slow_jobs} jobs to a receiver answering after {args.slow_seconds:g} s")

    rounds: list[dict[str, Any]] = []
    for number in range(1, args.rounds + 1):
        slow_key, idle_key, quick_key = tenant_keys(deployment.database_url, number)
        idle, _ = quick_delay(client, base_url, idle_key, receiver, f"/idle-{number}")
        slow_path = f"/slow-{number}"
        receiver.script(slow_path, Reply(delay=args.slow_seconds))
        started = time.monotonic()
        slow_jobs = [submit(client, base_url, slow_key, receiver.url(slow_path)) for _ in range(args.slow_jobs)]
        for job_id in slow_jobs:
            finished(client, base_url, slow_key, job_id, 600)
        receiver.wait_for(slow_path, lambda found: len(found) >= min(limit, args.slow_jobs), 60)
        behind, from_submit = quick_delay(client, base_url, quick_key, receiver, f"/quick-{number}")
        backlog = args.slow_jobs / limit * args.slow_seconds
        receiver.wait_for(slow_path, lambda found: len(found) >= args.slow_jobs, backlog * 3 + 60)
        time.sleep(args.slow_seconds + 1)  # the last answers
        measured = {
            "idle_s": idle,
            "behind_s": behind,
            "behind_from_submit_s": from_submit,
            "most_at_once": receiver.most_in_flight.get(slow_path, 0),
            "backlog_s": time.monotonic() - started,
        }
        log(
            f"round {number}: B's webhook {idle:.3f} s after its job's end idle, {behind:.3f} s behind A's slow "
            f"receiver ({from_submit:.3f} s after its submit); {measured['most_at_once']} requests at once at A's"
        )
        rounds.append(measured)
    return {
        "command": command,
        "code": str(args.code or "this checkout"),
        "machine": machine(),
        "services": f"{deployment.database_label}; {deployment.broker_label}; {deployment.s3_label}",
        "slow_jobs": args.slow_jobs,
        "slow_seconds": args.slow_seconds,
        "endpoint_concurrency": limit,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rounds": rounds,
        "idle_median_s": median([r["idle_s"] for r in rounds]),
        "behind_median_s": median([r["behind_s"] for r in rounds]),
    }


def tenant_keys(database_url: str, number: int) -> list[str]:
    """Three admin keys (diagnostic jobs need one), each in a new tenant of its own (so each round's endpoints are new)."""
    from db.keys import create_key
    from db.models import Role
    from db.session import dispose_engines, session_scope

    with session_scope(database_url) as session:
        keys = [create_key(session, f"fairness {name} {number}", Role.ADMIN)[1] for name in ("slow", "idle", "quick")]
    dispose_engines()
    return keys


def submit(client: requests.Session, base_url: str, key: str, webhook: str) -> str:
    response = client.post(
        f"{base_url}/v1/jobs",
        json={"type": "diagnostic", "input": {"steps": 1}, "webhook": webhook},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    if response.status_code != 202:
        raise RuntimeError(f"submit answered {response.status_code}: {response.text}")
    return str(response.json()["id"])


def finished(client: requests.Session, base_url: str, key: str, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(
            f"{base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30
        ).json()
        if job["status"] == "succeeded":
            return job
        if job["status"] in ("failed", "canceled"):
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} did not finish in {timeout:g} s")


def quick_delay(
    client: requests.Session, base_url: str, key: str, receiver: Receiver, path: str
) -> tuple[float, float]:
    """Submit one job with a prompt receiver: its webhook's delay after the job's end, and after its submit."""
    submitted = time.time()
    job_id = submit(client, base_url, key, receiver.url(path))
    job = finished(client, base_url, key, job_id, 600)
    [request] = receiver.wait_for(path, lambda found: len(found) >= 1, 300)
    ended = datetime.fromisoformat(job["finished_at"]).timestamp()
    return request.wall - ended, request.wall - submitted


def report(results: dict[str, Any]) -> None:
    print(
        f"\nWebhook fairness: tenant B's completed webhook while tenant A's {results['slow_jobs']} webhooks go to a "
        f"receiver answering after {results['slow_seconds']:g} s"
    )
    print(f"command: {results['command']}\ncode: {results['code']}\nmachine: {results['machine']}")
    print(f"services: {results['services']}")
    print(
        "load average (1, 5, 15 min): before "
        + ", ".join(f"{x:.2f}" for x in results["load_before"])
        + "; after "
        + ", ".join(f"{x:.2f}" for x in results["load_after"])
    )
    print("\n| round | B idle (after job end) | B behind A (after job end) | B behind A (after submit) | A at once |")
    print("|---|---:|---:|---:|---:|")
    for number, r in enumerate(results["rounds"], 1):
        print(
            f"| {number} | {r['idle_s']:.3f} s | {r['behind_s']:.3f} s | {r['behind_from_submit_s']:.3f} s | "
            f"{r['most_at_once']} |"
        )
    ratio = results["behind_median_s"] / results["idle_median_s"] if results["idle_median_s"] > 0 else float("inf")
    print(
        f"\nmedians: idle {results['idle_median_s']:.3f} s, behind {results['behind_median_s']:.3f} s "
        f"(ratio {ratio:.2f}×)"
        + (
            f"; endpoint concurrency limit {results['endpoint_concurrency']}"
            if results["code"] == "this checkout"
            else ""
        )
    )


if __name__ == "__main__":
    sys.exit(main())
