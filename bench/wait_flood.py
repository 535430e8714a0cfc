"""Wait flood: what 500 parked ``Prefer: wait`` requests cost another tenant's submits on one API process.

Run from the repository root (nothing to configure on this machine)::

    . .venv/bin/activate && python -m bench.wait_flood            # about 2 minutes with the defaults

One ``gpujobs api --workers 1`` (gunicorn, gevent) with no worker, on a fresh deployment
(``bench.deployment``: a fresh PostgreSQL database on 127.0.0.1:5432 if one answers, else SQLite; an
embedded Redis and S3 server), with the default rate limit on as in production. ``--tenants`` tenants
queue ``--jobs-per-tenant`` jobs each, which nobody runs; then, ``--rounds`` times:

1. idle: another tenant sends ``--samples`` sequential submits and ``--probes`` ``/healthz`` probes;
2. flood: ``--waits`` concurrent ``GET /v1/jobs/<id>`` with ``Prefer: wait=<--wait-seconds>`` (asyncio
   streams on one thread of this process, bench/lib/flood.py), spread over the tenants' jobs; once the
   API has read them all and gone idle, the same submits and probes again, while every wait is parked;
3. the waits' answers are checked (all 200 ``queued`` after their full wait).

Printed: each round's medians, p90 and max, idle and during; the during/idle ratio of the submit
medians per round and over all rounds; the load average before and after. The test
(tests/integration/test_wait_flood.py) asserts the same flood's correctness, not this ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import requests

from bench.deployment import Deployment, run
from bench.lib.flood import Round, enough_open_files, flood_round, queue_jobs, submit_latencies, summary
from bench.lib.report import log, machine
from bench.lib.stats import median, percentile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="idle + flood rounds (default 3)")
    parser.add_argument("--waits", type=int, default=500, help="concurrent waits per flood (default 500)")
    parser.add_argument("--tenants", type=int, default=10, help="tenants the waits are spread over (default 10)")
    parser.add_argument("--jobs-per-tenant", type=int, default=5, help="queued jobs each tenant waits on (default 5)")
    parser.add_argument("--wait-seconds", type=int, default=30, help="Prefer: wait=N of each wait (default 30)")
    parser.add_argument("--samples", type=int, default=60, help="submits per phase (default 60)")
    parser.add_argument("--probes", type=int, default=20, help="/healthz probes per phase (default 20)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the children's logs")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.waits < 1 or args.tenants < 1 or args.jobs_per_tenant < 1 or args.samples < 1:
        parser.error("--rounds, --waits, --tenants, --jobs-per-tenant and --samples must be at least 1")
    command = " ".join(["python -m bench.wait_flood", *(argv if argv is not None else sys.argv[1:])])
    return run("wait-flood", lambda deployment: measure(args, command, deployment), report, args.json, args.keep_logs)


def measure(args: argparse.Namespace, command: str, deployment: Deployment) -> dict[str, Any]:
    from db.settings import Settings

    enough_open_files(args.waits * 2 + 256)
    load_before = os.getloadavg()
    deployment.start_services()
    default_rate_limit = Settings.model_fields["rate_limit_per_minute"].default
    deployment.prepare("gpujobs-bench-wait-flood", {"GPUJOBS_RATE_LIMIT_PER_MINUTE": str(default_rate_limit)}, "flood")
    assert deployment.stack is not None
    api, base_url = deployment.stack.start_api(workers=1)
    keys = tenant_keys(deployment.database_url, args.tenants + 1)
    flood_keys, other = keys[:-1], keys[-1]
    client = requests.Session()
    jobs = queue_jobs(client, base_url, flood_keys, args.jobs_per_tenant)
    per_tenant = -(-args.waits // args.tenants)
    targets = [(key, jobs[key][i % args.jobs_per_tenant]) for key in flood_keys for i in range(per_tenant)]
    targets = targets[: args.waits]
    submit_latencies(client, base_url, other, 5)  # warm up
    log(f"{len(targets)} waits of {args.wait_seconds}s over {args.tenants} tenants, {args.rounds} rounds")

    rounds: list[dict[str, Any]] = []
    for number in range(1, args.rounds + 1):
        measured = flood_round(base_url, api.pid, client, other, targets, args.wait_seconds, args.samples, args.probes)
        problems = measured.flood.problems()
        if problems:
            raise RuntimeError(f"round {number}: {problems}")
        log(f"round {number}:\n{measured.report()}")
        rounds.append(figures(measured))
    idle = [x for r in rounds for x in r["submit_idle"]]
    during = [x for r in rounds for x in r["submit_during"]]
    return {
        "command": command,
        "machine": machine(),
        "services": f"{deployment.database_label}; {deployment.broker_label}; {deployment.s3_label}",
        "waits": len(targets),
        "wait_seconds": args.wait_seconds,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rounds": rounds,
        "ratio": median(during) / median(idle),
        "submit_idle": idle,
        "submit_during": during,
    }


def tenant_keys(database_url: str, count: int) -> list[str]:
    """``count`` user keys, each in a tenant of its own."""
    from db.keys import create_key
    from db.models import Role
    from db.session import dispose_engines, session_scope

    with session_scope(database_url) as session:
        keys = [create_key(session, f"wait-flood tenant {i}", Role.USER)[1] for i in range(count)]
    dispose_engines()
    return keys


def figures(measured: Round) -> dict[str, Any]:
    seconds = [s for _, s, _ in measured.flood.results]
    return {
        "submit_idle": measured.idle,
        "submit_during": measured.during,
        "health_idle": measured.idle_health,
        "health_during": measured.during_health,
        "ratio": median(measured.during) / median(measured.idle),
        "parked_after_s": measured.parked_after,
        "waits_answered_s": [min(seconds), max(seconds)],
    }


def report(results: dict[str, Any]) -> None:
    def ms(values: list[float], q: float | None = None) -> str:
        return f"{(percentile(values, q) if q else median(values)) * 1000:.1f}"

    print(f"\nWait flood: {results['waits']} concurrent Prefer: wait={results['wait_seconds']} on one gevent process")
    print(f"command: {results['command']}\nmachine: {results['machine']}\nservices: {results['services']}")
    print(
        "load average (1, 5, 15 min): before "
        + ", ".join(f"{x:.2f}" for x in results["load_before"])
        + "; after "
        + ", ".join(f"{x:.2f}" for x in results["load_after"])
    )
    print(
        "\n| round | submit median idle | p90 idle | median during | p90 during | ratio | /healthz max during | waits answered |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for number, r in enumerate(results["rounds"], 1):
        answered = "–".join(f"{s:.1f}" for s in r["waits_answered_s"])
        print(
            f"| {number} | {ms(r['submit_idle'])} ms | {ms(r['submit_idle'], 90)} ms | {ms(r['submit_during'])} ms | "
            f"{ms(r['submit_during'], 90)} ms | {r['ratio']:.2f}× | {max(r['health_during']) * 1000:.1f} ms | {answered} s |"
        )
    idle, during = results["submit_idle"], results["submit_during"]
    print(
        f"\nall rounds: submits idle {summary(idle)}; during {summary(during)}; during/idle medians {results['ratio']:.2f}×"
    )


if __name__ == "__main__":
    sys.exit(main())
