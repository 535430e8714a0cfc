"""Quota cost: what a tenant's quota checks add to ``POST /v1/jobs``, with a backlog of queued jobs and stored outputs.

Run from the repository root (nothing to configure on this machine)::

    . .venv/bin/activate && python -m bench.quota_cost            # about a minute with the defaults

One ``gpujobs api --workers 1`` with no worker, on a fresh deployment (``bench.deployment``), the default
per-key rate limit on. Three tenants, each given ``--backlog`` queued jobs and as many stored artifacts
(inserted directly, as if submitted and run earlier):

- ``off``: every quota 0 (no check at all: the baseline);
- ``default``: no override, so the defaults (``max_queued_jobs`` 10,000: one bounded count);
- ``all``: the three submit quotas set high enough never to refuse (the queued count, the retained-bytes
  sum and the Redis submit counter, every one of them run).

Submits alternate between the tenants sample by sample (``--samples`` each, after a warm-up), so that
other work on the machine hits them alike. Printed: each tenant's median and p90 submit latency, the
ratio of its median to ``off``'s, and the load average before and after.
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
from bench.lib.stats import median, percentile

SUBMIT = {"type": "diagnostic", "input": {"sleep_seconds": 0, "steps": 1}}
TENANTS = ("off", "default", "all")
OVERRIDES: dict[str, dict[str, int]] = {
    "off": {"max_queued_jobs": 0, "submits_per_minute": 0, "max_retained_bytes": 0},
    "default": {},
    "all": {"max_queued_jobs": 10_000_000, "submits_per_minute": 1_000_000, "max_retained_bytes": 10**15},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=300, help="submits per tenant (default 300)")
    parser.add_argument("--backlog", type=int, default=2000, help="queued jobs and artifacts per tenant (default 2000)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the children's logs")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.backlog < 0:
        parser.error("--samples must be at least 1 and --backlog at least 0")
    command = " ".join(["python -m bench.quota_cost", *(argv if argv is not None else sys.argv[1:])])
    return run("quota-cost", lambda deployment: measure(args, command, deployment), report, args.json, args.keep_logs)


def measure(args: argparse.Namespace, command: str, deployment: Deployment) -> dict[str, Any]:
    from db.settings import Settings

    load_before = os.getloadavg()
    deployment.start_services()
    default_rate_limit = Settings.model_fields["rate_limit_per_minute"].default
    admin = deployment.prepare("gpujobs-bench-quotas", {"GPUJOBS_RATE_LIMIT_PER_MINUTE": str(default_rate_limit)}, "q")
    assert deployment.stack is not None
    _api, base_url = deployment.stack.start_api(workers=1)
    keys = tenants(deployment.database_url, args.backlog)
    client = requests.Session()
    for name, key in keys.items():
        tenant = client.get(f"{base_url}/v1/tenants/{key[1]}", headers=_auth(admin)).json()
        if OVERRIDES[name]:
            put = client.put(f"{base_url}/v1/tenants/{key[1]}/quotas", json=OVERRIDES[name], headers=_auth(admin))
            put.raise_for_status()
            tenant = put.json()
        log(f"{name}: quotas {tenant['quotas']}, usage {tenant['usage']}")
    for name in TENANTS:  # warm up every path
        for _ in range(10):
            _submit(client, base_url, keys[name][0])
    latencies: dict[str, list[float]] = {name: [] for name in TENANTS}
    for _ in range(args.samples):
        for name in TENANTS:
            latencies[name].append(_submit(client, base_url, keys[name][0]))
    return {
        "command": command,
        "machine": machine(),
        "services": f"{deployment.database_label}; {deployment.broker_label}; {deployment.s3_label}",
        "backlog": args.backlog,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "latencies": latencies,
    }


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _submit(client: requests.Session, base_url: str, key: str) -> float:
    started = time.perf_counter()
    response = client.post(f"{base_url}/v1/jobs", json=SUBMIT, headers=_auth(key), timeout=60)
    elapsed = time.perf_counter() - started
    if response.status_code != 202:
        raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")
    return elapsed


def tenants(database_url: str, backlog: int) -> dict[str, tuple[str, str]]:
    """An admin key (the diagnostic type is admin-only) in a tenant of its own for each name, with ``backlog``
    queued jobs and as many stored artifacts of finished jobs; name → (key, tenant id)."""
    from db.keys import create_key
    from db.models import Artifact, JobStatus, Role
    from db.session import dispose_engines, session_scope

    found = {}
    with session_scope(database_url) as session:
        for name in TENANTS:
            row, key = create_key(session, f"quota-cost {name}", Role.ADMIN)
            found[name] = (key, row.tenant_id)
            for status in (JobStatus.QUEUED, JobStatus.SUCCEEDED):
                jobs = [_job(row.tenant_id, status) for _ in range(backlog)]
                session.add_all(jobs)
                if status == JobStatus.SUCCEEDED:
                    session.flush()
                    session.add_all(
                        Artifact(
                            job_id=job.id,
                            name="artifact",
                            content_type="application/json",
                            size=1000,
                            sha256="0" * 64,
                            storage_key=f"jobs/{job.id}/1/artifact",
                        )
                        for job in jobs
                    )
    dispose_engines()
    return found


def _job(tenant_id: str, status: Any) -> Any:
    from db.models import Job, new_id, utcnow

    return Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        type="diagnostic",
        queue="gpu",
        status=status.value,
        input=SUBMIT["input"],
        max_attempts=2,
        deadline_seconds=900,
        created_at=utcnow(),
        finished_at=utcnow() if status.finished else None,
    )


def report(results: dict[str, Any]) -> None:
    latencies = results["latencies"]
    base = median(latencies["off"])
    print(f"\nQuota cost: POST /v1/jobs per tenant, {results['backlog']} queued jobs and artifacts each")
    print(f"command: {results['command']}\nmachine: {results['machine']}\nservices: {results['services']}")
    print(
        "load average (1, 5, 15 min): before "
        + ", ".join(f"{x:.2f}" for x in results["load_before"])
        + "; after "
        + ", ".join(f"{x:.2f}" for x in results["load_after"])
    )
    print("\n| tenant's quotas | submits | median | p90 | median / off |")
    print("|---|---:|---:|---:|---:|")
    for name in TENANTS:
        values = latencies[name]
        print(
            f"| {name} | {len(values)} | {median(values) * 1000:.2f} ms | {percentile(values, 90) * 1000:.2f} ms | "
            f"{median(values) / base:.2f}× |"
        )


if __name__ == "__main__":
    sys.exit(main())
