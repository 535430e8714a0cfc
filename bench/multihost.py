"""Jobs/s with one and with two worker hosts, and the time to requeue after a cut link, over a real network.

The deployment is the multi-host tests' (``tests/integration/netns.py``): network namespaces on a private
subnet, PostgreSQL, Redis, S3 and ``gpujobs api`` on the ``services`` host, beat and a maintenance worker on
``ops``, ``gpujobs worker --queues gpu`` on worker hosts ``a`` and ``b`` (3 s leases). Needs root, ``ip`` and
``nft`` (``make nftables``).

1. Throughput: with only host a's worker running, ``--jobs`` diagnostic jobs (``--sleep`` seconds each) are
   submitted at once and the time from the first submit to the last job's success gives jobs/s; then host b's
   worker starts and the same runs again. ``--rounds`` of each; medians are reported.
2. Requeue after a partition: ``--cuts`` times, a long job runs on host a, a's link is cut, and the time until
   the job runs on host b is measured (the lease is 3 s); the link is restored after the job succeeded.
3. Every job submitted is checked at the end: lost (not succeeded) and duplicated (succeeded more than once)
   jobs are counted; both must be 0.

    python -m bench.multihost                 # about 2 minutes with the defaults
    python -m bench.multihost --jobs 40 --sleep 0 --json figures.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lib.report import log, machine, ratio, write_json
from bench.lib.stats import median
from tests.integration import netns
from tests.integration.netns import MultiHost, wait_until


def throughput(deployment: MultiHost, jobs: int, sleep: float, submitted: list[str]) -> float:
    """Submit ``jobs`` diagnostic jobs at once; jobs/s from the first submit to the last success."""
    started = time.monotonic()
    job_ids = [deployment.submit(steps=1, sleep_seconds=sleep) for _ in range(jobs)]
    submitted += job_ids
    for job_id in job_ids:
        deployment.wait_for(job_id, timeout=600)
    return jobs / (time.monotonic() - started)


def requeue_after_cut(deployment: MultiHost, submitted: list[str]) -> float:
    """Seconds from cutting host a's link to its job running (attempt 2) on host b."""
    a = deployment.host("a")
    job_ids = [deployment.submit(steps=10, sleep_seconds=5) for _ in range(2)]  # one slot on each host
    submitted += job_ids
    wait_until(lambda: all(deployment.claims(job_id) for job_id in job_ids), "both jobs claimed", 60)
    on_a = next(job_id for job_id in job_ids if deployment.claims(job_id) == ["a"])
    wait_until(lambda: deployment.job(on_a)["progress"]["step"] >= 2, "the job on host a at step 2", 60)
    cut_at = time.monotonic()
    deployment.network.cut(a)
    try:
        deployment.wait_for(on_a, "running", timeout=60, attempts=2)
        seconds = time.monotonic() - cut_at
        for job_id in job_ids:
            deployment.wait_for(job_id, timeout=120)
    finally:
        deployment.network.restore(a)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=24, help="diagnostic jobs per throughput run (default 24)")
    parser.add_argument("--sleep", type=float, default=0.5, help="seconds each job sleeps (default 0.5)")
    parser.add_argument("--concurrency", type=int, default=1, help="job slots per worker host (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per worker-host count (default 3)")
    parser.add_argument("--cuts", type=int, default=3, help="cut-link requeue measurements (default 3)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    reason = netns.unavailable_reason()
    if reason is not None:
        log(f"cannot run: {reason}")
        return 2
    submitted: list[str] = []
    figures: dict[str, Any] = {"machine": machine(), "jobs": args.jobs, "sleep_seconds": args.sleep}
    with (
        tempfile.TemporaryDirectory(prefix="gpujobs-bench-multihost-") as tmp,
        netns.multihost(Path(tmp)) as deployment,
    ):
        deployment.start_worker("a", concurrency=args.concurrency)
        rates: dict[int, list[float]] = {1: [], 2: []}
        for hosts in (1, 2):
            if hosts == 2:
                deployment.start_worker("b", concurrency=args.concurrency)
            throughput(deployment, min(args.jobs, 4), args.sleep, submitted)  # warm-up: connections, imports
            for round_ in range(1, args.rounds + 1):
                rates[hosts].append(throughput(deployment, args.jobs, args.sleep, submitted))
                log(f"{hosts} worker host(s), round {round_}: {rates[hosts][-1]:.2f} jobs/s")
        requeues = []
        for cut in range(1, args.cuts + 1):
            requeues.append(requeue_after_cut(deployment, submitted))
            log(f"cut {cut}: running elsewhere {requeues[-1]:.2f} s after the cut")
        lost, duplicated = deployment.lost_and_duplicated(submitted)
    one, two = median(rates[1]), median(rates[2])
    figures |= {
        "jobs_per_second": {"one_host": rates[1], "two_hosts": rates[2]},
        "requeue_after_cut_seconds": requeues,
        "jobs_submitted": len(submitted),
        "lost": len(lost),
        "duplicated": len(duplicated),
    }
    print(f"machine: {figures['machine']}")
    print(f"diagnostic jobs ({args.jobs} per run, {args.sleep:g} s each, {args.concurrency} slot(s) per host):")
    print(f"  one worker host:  {one:.2f} jobs/s (median of {len(rates[1])})")
    print(f"  two worker hosts: {two:.2f} jobs/s (median of {len(rates[2])}), {ratio(two, one)} of one host")
    if requeues:
        print(f"requeue after a cut link (3 s lease): median {median(requeues):.2f} s, max {max(requeues):.2f} s")
    print(f"jobs submitted: {len(submitted)}, lost: {len(lost)}, duplicated: {len(duplicated)}")
    if args.json:
        write_json(args.json, figures)
    return 0 if not lost and not duplicated else 1


if __name__ == "__main__":
    sys.exit(main())
