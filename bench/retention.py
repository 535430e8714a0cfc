"""What one retention batch costs on a small and on a large jobs table (``worker.retention.retention_batch``).

For each size it makes a fresh PostgreSQL database, loads that many finished jobs (one artifact and one event
each, over 1,000 tenants, their ends spread over 30 days) with one ``INSERT … SELECT generate_series`` per
table, and times, median of ``--samples``, one batch that has nothing due, one that expires a full batch
(TTL 5 days) and one that purges a full batch (retention 5 days): 5/6 of the jobs are due. Storage is a real embedded S3 server;
the objects were never written (``DeleteObjects`` answers success for a missing key, at the same cost).
The large size's medians are also given as a ratio of the small one's, measured in the same run.

    python -m bench.retention                       # 5,000 and 1,000,000 jobs: about 2 minutes
    python -m bench.retention --sizes 5000 100000
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lib.report import log, machine, ratio, write_json

DAY = 86400
CASES = {
    "nothing due": {"artifact_ttl": 40 * DAY, "job_retention": 40 * DAY},
    "expire a batch": {"artifact_ttl": 5 * DAY},
    "purge a batch": {"job_retention": 5 * DAY},
}


def load(conninfo: str, jobs: int) -> None:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as db:
        db.execute(
            "INSERT INTO tenants (id, name, created_at) SELECT 'ten_' || g, 't' || g, now() FROM generate_series(1, 1000) g"
        )
        db.execute(
            """INSERT INTO jobs (id, tenant_id, type, queue, status, input, metadata, progress, attempts, max_attempts,
                 deadline_seconds, created_at, finished_at, webhook_events_filter, priority)
               SELECT 'job_' || g, 'ten_' || (g %% 1000 + 1), 'diagnostic', 'gpu', 'succeeded', '{}', '{}', '{}', 1, 3,
                 60, now() - ((%(n)s - g) * interval '30 days' / %(n)s), now() - ((%(n)s - g) * interval '30 days' / %(n)s),
                 '["completed"]', 5
               FROM generate_series(1, %(n)s) g""",
            {"n": jobs},
        )
        db.execute(
            """INSERT INTO artifacts (job_id, name, content_type, size, sha256, storage_key, created_at)
               SELECT id, 'diagnostic.json', 'application/json', 10, repeat('0', 64),
                      'jobs/' || id || '/1/diagnostic.json', finished_at FROM jobs"""
        )
        db.execute(
            "INSERT INTO job_events (job_id, at, kind, attempt) SELECT id, finished_at, 'succeeded', 1 FROM jobs"
        )
        db.execute("VACUUM ANALYZE")


def measure(jobs: int, samples: int, s3: Any) -> dict[str, Any]:
    import migrations
    from db.session import dispose_engines
    from db.settings import Settings, reset_settings
    from db.storage import Storage
    from gpujobs.harness.databases import provision_database
    from worker.retention import retention_batch

    database = provision_database(Path(tempfile.mkdtemp()), purpose="bench")
    if not database.is_postgres:
        raise SystemExit("bench.retention needs PostgreSQL on 127.0.0.1:5432")
    try:
        migrations.upgrade(database.url)
        started = time.perf_counter()
        load(database.url.replace("postgresql+psycopg://", "postgresql://"), jobs)
        log(f"{jobs:,} jobs loaded in {time.perf_counter() - started:.1f} s")
        os.environ["GPUJOBS_DATABASE_URL"] = database.url  # retention's sessions use the process settings
        reset_settings()
        dispose_engines()
        base = Settings(
            database_url=database.url,
            s3_endpoint_url=s3.endpoint_url,
            s3_access_key=s3.access_key,
            s3_secret_key=s3.secret_key,
            s3_bucket="bench-retention",
        )
        storage = Storage(base)
        storage.ensure_bucket()
        figures: dict[str, Any] = {}
        for case, values in CASES.items():
            settings = base.model_copy(update=values)
            times, counts = [], []
            for _ in range(samples):
                t = time.perf_counter()
                report = retention_batch(settings, storage)
                times.append(time.perf_counter() - t)
                counts.append(report.artifacts_expired + report.jobs_purged)
            figures[case] = {"median_ms": round(statistics.median(times) * 1000, 1), "rows_per_batch": counts}
            log(f"{jobs:,} jobs, {case}: median {figures[case]['median_ms']} ms, rows per batch {counts}")
        return figures
    finally:
        dispose_engines()
        database.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[5_000, 1_000_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--samples", type=int, default=7, help="batches timed per case (each a full one)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from gpujobs.harness.servers import start_s3

    s3 = start_s3(Path(tempfile.mkdtemp()) / "s3")
    try:
        load_before = os.getloadavg()[0]
        small, large = (measure(size, args.samples, s3) for size in args.sizes)
        load_after = os.getloadavg()[0]
    finally:
        s3.stop()
    print(f"machine: {machine()}; load average {load_before:.2f} before, {load_after:.2f} after")
    print(f"{'case':<16}{args.sizes[0]:>12,} jobs{args.sizes[1]:>14,} jobs   ratio")
    for case in CASES:
        a, b = small[case]["median_ms"], large[case]["median_ms"]
        print(f"{case:<16}{a:>14.1f} ms{b:>16.1f} ms   {ratio(b, a)}")
    if args.json:
        write_json(args.json, {"sizes": args.sizes, "small": small, "large": large, "machine": machine()})


if __name__ == "__main__":
    main()
