"""Flat at a million jobs: the control plane's reads and passes timed on a small and on a large job history.

    python -m bench.scale                        # 1,000 and 1,000,000 jobs over 1,000 tenants
    python -m bench.scale --reuse                # keep the databases loaded by an earlier run
    python -m bench.scale --jobs 2000 --tenants 20 --baseline-jobs 200 --drop   # what the test runs

Two PostgreSQL databases of their own (``gpujobs_scale`` and ``gpujobs_scale_base`` on 127.0.0.1:5432,
never the tests'), migrated, then filled by ``bench.lib.scale_data`` with the same mix: ``--baseline-jobs``
(default 1,000) and ``--jobs`` (default 1,000,000) jobs, both over ``--tenants`` tenants and arriving at
the same ``--rate`` (1,400 an hour: the small history is 43 minutes long, the large one 30 days), with the
same in-flight ``--backlog`` (300 queued, 60 running). So the ratio is what a longer history costs, under
the same load and for the same tenants. ``--reuse`` keeps a database already holding that many jobs;
``--drop`` drops both at the end.

Each row is timed in this process, warm (``--warmup`` runs first), ``--runs`` times, and the median kept:
the HTTP rows through the real app with Flask's test client (no sockets: the app's own cost, a few ms above
what a client of ``gpujobs api`` sees), with an embedded Redis as the broker and an embedded S3 server; the
passes by calling them. The user rows act as the busiest tenant (about 3 % of all jobs), the admin rows see
every tenant. Before each database's rows the data are freshened (leases renewed, heartbeats, the queued
jobs' messages recent) and one reconcile pass folds the counts' deltas as the live reconciler does, so a
timed reconcile pass finds nothing to repair: its steady cost. Retention is on
(outputs kept for half the history, jobs for three quarters), so each retention batch expires and purges
up to its batch size; a later ``--reuse`` then finds fewer jobs and loads the database again. The batch
size is ``--retention-batch`` (default 20, the service's is 500) on both databases: the small history has
about 250 jobs due in all, so with 500 its later runs timed empty batches against full ones on the large
database; 20 gives every warm-up and timed run of either a full batch, the same work.

It prints a table (1k, 1M, ratio) and the load average; ``--json`` writes the figures. The aim (issue 15):
each row within 2x of its small-database time and under 200 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.deployment import Deployment
from bench.lib import scale_data
from bench.lib.report import log, machine, ratio, write_json
from gpujobs.harness.databases import PG_HOST, PG_PORT, postgres_maintenance_conninfo

AIM_RATIO = 2.0
AIM_MS = 200.0
HTML = {"Accept": "text/html"}


@dataclass
class Row:
    name: str
    run: Callable[[], None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--baseline-jobs", type=int, default=1_000)
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--rate", type=float, default=1_400.0, help="jobs an hour: the history's length")
    parser.add_argument("--backlog", type=int, default=300, help="queued jobs (and a fifth as many running)")
    parser.add_argument("--database", default="gpujobs_scale", help="the large one; the small one adds _base")
    parser.add_argument("--reuse", action="store_true", help="keep a database that already holds the jobs")
    parser.add_argument("--drop", action="store_true", help="drop both databases at the end")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--retention-batch", type=int, default=20, help="retention's batch size on both databases (same work each run)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if (
        min(args.jobs, args.baseline_jobs, args.tenants, args.runs, args.retention_batch) < 1
        or args.warmup < 0
        or args.backlog < 0
    ):
        parser.error(
            "--jobs, --baseline-jobs, --tenants, --runs and --retention-batch must be at least 1, "
            "--warmup and --backlog 0"
        )
    if not args.rate > 0:
        parser.error("--rate must be positive")
    if not args.database.startswith("gpujobs_scale") or not args.database.replace("_", "").isalnum():
        # It is dropped and loaded again: never a name that could be a deployment's or the tests' database.
        parser.error("--database: gpujobs_scale followed by lower-case letters, digits and _ only")
    if not args.database.islower():
        parser.error("--database: lower-case letters, digits and _ only")
    maintenance = postgres_maintenance_conninfo()
    if maintenance is None:
        print(f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT}: this benchmark needs it", file=sys.stderr)
        return 2

    deployment = Deployment.new("scale")
    started, load_before = time.monotonic(), os.getloadavg()
    sizes = [("small", args.baseline_jobs, f"{args.database}_base"), ("large", args.jobs, args.database)]
    try:
        # The database is given (so not created or dropped there); the broker and S3 are embedded.
        deployment.start_services(database_url=database_url(args.database))
        results: dict[str, Any] = {"machine": machine(), "runs": args.runs, "tenants": args.tenants, "sizes": {}}
        timings: dict[str, dict[str, float]] = {}
        for label, jobs, name in sizes:
            url = prepare_database(maintenance, name, jobs, args)
            results["sizes"][label] = {"database": name, "jobs": jobs}
            timings[label] = measure(deployment, url, args.runs, args.warmup, jobs / args.rate, args.retention_batch)
        results["load_average"] = {"start": load_before, "end": os.getloadavg()}
        results["rows"] = table(timings, sizes)
        if args.json:
            write_json(args.json, results)
    finally:
        deployment.stop(keep_logs=False)
        if args.drop:
            for _, _, name in sizes:
                drop(maintenance, name)
    log(f"done in {time.monotonic() - started:.0f} s")
    return 0


# --- the databases -------------------------------------------------------------------------------


def prepare_database(maintenance: str, name: str, jobs: int, args: argparse.Namespace) -> str:
    """``name`` created (or emptied) and loaded with ``jobs`` jobs, unless ``--reuse`` and it holds them."""
    import migrations

    url = database_url(name)
    conninfo = url.replace("postgresql://", "postgres://")
    with psycopg.connect(maintenance, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and args.reuse and scale_data.loaded_jobs(conninfo) == jobs:
            log(f"{name}: reusing its {jobs:,} jobs")
            migrations.upgrade(url)  # new indexes, if this tree has more
            return url
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    migrations.upgrade(url)
    log(f"{name}: loading {jobs:,} jobs over {args.tenants:,} tenants, {args.rate:g} an hour")
    began = time.monotonic()
    scale_data.load(conninfo, jobs, args.tenants, seed=name, rate=args.rate, backlog=args.backlog)
    log(f"{name}: loaded in {time.monotonic() - began:.0f} s")
    return url


def database_url(name: str) -> str:
    return f"postgresql://{os.environ.get('PGUSER', 'postgres')}@{PG_HOST}:{PG_PORT}/{name}"


def drop(maintenance: str, name: str) -> None:
    from db.session import dispose_engines

    dispose_engines()
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the timings ---------------------------------------------------------------------------------


def measure(
    deployment: Deployment, url: str, runs: int, warmup: int, history_hours: float, retention_batch: int
) -> dict[str, float]:
    """Every row's median in milliseconds on the database at ``url``."""
    from db.session import dispose_engines

    os.environ["GPUJOBS_DATABASE_URL"] = url
    deployment.database = None
    admin_key = prepare(deployment, url, history_hours, retention_batch)
    scale_data.freshen(url.replace("postgresql://", "postgres://"))
    # A live system's reconciler folds the triggers' deltas into job_counts and retained_bytes at every
    # pass; a fresh load leaves one delta per job and artifact, which /metrics and the tenants page would sum.
    reconcile_pass()
    rows = build_rows(admin_key)
    found: dict[str, float] = {}
    for row in rows:
        for _ in range(warmup):
            row.run()
        samples = []
        for _ in range(runs):
            began = time.perf_counter()
            row.run()
            samples.append((time.perf_counter() - began) * 1000)
        found[row.name] = statistics.median(samples)
        log(f"{row.name}: {found[row.name]:.1f} ms")
    dispose_engines()
    return found


def prepare(deployment: Deployment, url: str, history_hours: float, retention_batch: int) -> str:
    """The services' settings in this process, the schema, the bucket and an admin key; the key.

    Retention is on, scaled to the history so that a retention batch has work on either database: outputs
    kept for half the history, jobs for three quarters of it (the defaults keep everything forever)."""
    from gpujobs.harness.databases import Database

    deployment.database = Database(url=url, owned_postgres=False)  # never dropped by stop()
    retention = {
        "GPUJOBS_ARTIFACT_TTL": str(max(1, int(history_hours * 3600 / 2))),
        "GPUJOBS_JOB_RETENTION": str(max(1, int(history_hours * 3600 * 3 / 4))),
        "GPUJOBS_RETENTION_BATCH_SIZE": str(retention_batch),
    }
    return deployment.prepare("gpujobs-scale", retention, "scale")


def build_rows(admin_key: str) -> list[Row]:
    from sqlalchemy import func, select

    from api import create_app
    from db.keys import create_key
    from db.models import Job, Role
    from db.session import session_scope

    app = create_app()
    with session_scope() as session:
        busiest = session.scalar(
            select(Job.tenant_id)
            .where(Job.tenant_id.like("ten_scale%"))
            .group_by(Job.tenant_id)
            .order_by(func.count().desc())
            .limit(1)
        )
        _, user_key = create_key(session, "scale user", Role.USER, busiest)
        job_id = session.scalar(
            select(Job.id)
            .where(Job.tenant_id == busiest, Job.status == "succeeded")
            .order_by(Job.created_at.desc())
            .limit(1)
        )
    user = app.test_client()
    admin = app.test_client()
    page = admin.get("/admin/login", headers=HTML).get_data(as_text=True)
    token = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    login = admin.post("/admin/login", data={"csrf_token": token, "key": admin_key}, headers=HTML)
    assert login.status_code == 303, login.get_data(as_text=True)[:500]
    as_user = {"Authorization": f"Bearer {user_key}"}
    as_admin = {"Authorization": f"Bearer {admin_key}"}

    def get(client: Any, path: str, headers: dict[str, str]) -> Callable[[], None]:
        def call() -> None:
            response = client.get(path, headers=headers)
            assert response.status_code == 200, f"{path}: {response.status_code} {response.get_data()[:300]!r}"

        return call

    def submit() -> None:
        response = user.post("/v1/jobs", json={"type": "diagnostic", "input": {}}, headers=as_admin)
        assert response.status_code in (201, 202), response.get_data(as_text=True)[:300]

    return [
        Row("POST /v1/jobs (submit)", submit),
        Row("GET /v1/jobs/{id}", get(user, f"/v1/jobs/{job_id}", as_user)),
        Row("GET /v1/jobs (tenant, first page)", get(user, "/v1/jobs", as_user)),
        Row("GET /v1/jobs?status=failed (tenant)", get(user, "/v1/jobs?status=failed", as_user)),
        Row("GET /v1/jobs?type=inpainting (tenant)", get(user, "/v1/jobs?type=inpainting", as_user)),
        Row("GET /v1/jobs (admin, all tenants)", get(user, "/v1/jobs", as_admin)),
        Row("GET /v1/jobs?status=failed (admin)", get(user, "/v1/jobs?status=failed", as_admin)),
        Row("GET /v1/jobs?type=inpainting (admin)", get(user, "/v1/jobs?type=inpainting", as_admin)),
        Row("GET /metrics/cluster", get(user, "/metrics/cluster", {})),
        Row("admin overview", get(admin, "/admin/", HTML)),
        Row("admin jobs page", get(admin, "/admin/jobs", HTML)),
        Row("admin jobs page, status=failed", get(admin, "/admin/jobs?status=failed", HTML)),
        Row("admin tenants page (last 24 h)", get(admin, "/admin/tenants", HTML)),
        Row("admin tenants page (last 1 h)", get(admin, "/admin/tenants?period=1h", HTML)),
        Row("reconcile pass", reconcile_pass),
        Row("dispatcher pass", dispatcher_pass()),
        Row("retention batch", retention_pass()),
    ]


def reconcile_pass() -> None:
    from worker.reconciler import reconcile

    reconcile()


def dispatcher_pass() -> Callable[[], None]:
    from worker.dispatcher import dispatch_pass

    return lambda: dispatch_pass("gpu") and None


def retention_pass() -> Callable[[], None]:
    from worker.retention import retention_batch

    return lambda: retention_batch() and None


# --- the table -----------------------------------------------------------------------------------


def table(timings: dict[str, dict[str, float]], sizes: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
    small_jobs, large_jobs = sizes[0][1], sizes[1][1]
    header = f"{'':40} {f'{small_jobs:,} jobs':>14} {f'{large_jobs:,} jobs':>16} {'ratio':>7}  aim"
    print(header)
    print("-" * len(header))
    rows: list[dict[str, Any]] = []
    for name, small in timings["small"].items():
        large = timings["large"][name]
        met = large <= AIM_RATIO * small and large < AIM_MS
        print(f"{name:40} {small:11.1f} ms {large:13.1f} ms {ratio(large, small):>7}  {'met' if met else 'MISSED'}")
        rows.append({"name": name, "small_ms": small, "large_ms": large, "ratio": large / small, "met": met})
    load = os.getloadavg()
    print(
        f"aim: each at most {AIM_RATIO:g}x its small time and under {AIM_MS:g} ms; load average now "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {machine()}"
    )
    return rows


if __name__ == "__main__":
    sys.exit(main())
