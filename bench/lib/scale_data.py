"""A job history of any size, written by PostgreSQL itself (``INSERT … SELECT generate_series``), for ``scale.py``.

What a service looks like after running for a while at a steady rate: jobs arrive at ``rate`` an hour
(default 1,400: a million in 30 days), so a small history is a young service and a large one an old
service under the same load. The in-flight backlog is a property of the load, not of the history, so it is
the same in both: ``backlog`` queued jobs and a fifth as many running (created in the last hour; at most a
tenth of the jobs). The rest finished: 88 % succeeded, 6 % failed, 4 % canceled (half of them before
starting). Tenants: ``tenants``, a few busy ones and a long tail (tenant ``k`` is drawn with density ∝ 1/√k).
Types: segmentation 40 %, text_to_image 30 %, inpainting 10 %, style_transfer 8 %, diagnostic 10 %,
finetune 2 % (``train`` queue). Every job has its timeline (queued, dispatched, claimed, a progress event
for the diffusion jobs that succeeded, its end: about 4 events a job), every succeeded job one or two
artifacts, one finished job in ten a webhook with its ``completed`` delivery and that delivery's attempt.
Four workers, one key per tenant.

Rows are inserted in the order of their creation time, as a live service writes them (so the physical
order of the table correlates with ``created_at``, as it does in production). No Python row loop: the
million jobs take a few minutes on two cores.
"""

from __future__ import annotations

import psycopg

from bench.lib.report import log

TENANTS = """
INSERT INTO tenants (id, name, created_at)
SELECT 'ten_scale' || lpad(k::text, 6, '0'), 'scale tenant ' || k, now() - interval '90 days'
FROM generate_series(1, %(tenants)s) k
"""

KEYS = """
INSERT INTO api_keys (id, tenant_id, name, role, key_hash, created_at)
SELECT 'key_scale' || lpad(k::text, 6, '0'), 'ten_scale' || lpad(k::text, 6, '0'), 'scale key ' || k, 'user',
       encode(sha256(('scale-key-' || k)::bytea), 'hex'), now() - interval '90 days'
FROM generate_series(1, %(tenants)s) k
"""

# One row of random draws per job, then the job's columns from them; ordered by creation time.
JOBS = """
INSERT INTO jobs (id, tenant_id, type, queue, status, input, metadata, output, error, progress, attempts,
                  max_attempts, deadline_seconds, worker_id, lease_expires_at, dispatched_at, created_at,
                  started_at, finished_at, webhook, webhook_events_filter, priority)
SELECT id, tenant_id, type, CASE WHEN type = 'finetune' THEN 'train' ELSE 'gpu' END, status,
       json_build_object('prompt', 'a photo of item ' || i, 'seed', i, 'steps', 20),
       '{}'::json,
       CASE WHEN status = 'succeeded' THEN json_build_object('artifact', json_build_object(
           'name', 'output.json', 'content_type', 'application/json', 'size', 2048, 'sha256', md5(id) || md5(id)))
       END,
       CASE WHEN status = 'failed' THEN '{"type": "JobError", "message": "the input image is too small"}'::json END,
       CASE WHEN status = 'succeeded' THEN '{"step": 1, "total": 1, "fraction": 1.0}'::json ELSE '{}'::json END,
       CASE WHEN status = 'queued' THEN 0 ELSE 1 END,
       3, 900,
       CASE WHEN status = 'running' THEN 'scale-worker-1' END,
       CASE WHEN status = 'running' THEN now() + interval '1 hour' END,
       created + interval '20 milliseconds',
       created,
       CASE WHEN status = 'queued' OR (status = 'canceled' AND r_run < 0.5) THEN NULL
            ELSE created + wait END,
       CASE WHEN status IN ('queued', 'running') THEN NULL
            WHEN status = 'canceled' AND r_run < 0.5 THEN created + wait
            ELSE created + wait + run END,
       CASE WHEN r_hook < 0.1 THEN 'https://hooks.example.com/gpujobs' END,
       '["completed"]'::json,
       CASE WHEN r_hook < 0.8 THEN 5 ELSE floor(r_hook * 50)::int %% 10 END
FROM (
    SELECT i, r_run, r_hook,
           'job_' || substr(md5(%(seed)s || ':' || i), 1, 22) AS id,
           'ten_scale' || lpad((1 + floor(%(tenants)s * power(r_tenant, 2)))::int::text, 6, '0') AS tenant_id,
           type, status,
           CASE WHEN status IN ('queued', 'running') THEN now() - r_age * interval '1 hour'
                WHEN type = 'finetune' THEN now() - interval '2 hours' - r_age * %(span)s * interval '1 hour'
                ELSE now() - interval '2 minutes' - r_age * %(span)s * interval '1 hour' END AS created,
           power(r_wait, 3) * interval '60 seconds' AS wait,
           CASE type WHEN 'finetune' THEN interval '600 seconds' + r_run * interval '3000 seconds'
                     WHEN 'segmentation' THEN interval '300 milliseconds' + r_run * interval '3 seconds'
                     WHEN 'diagnostic' THEN interval '500 milliseconds' + r_run * interval '2 seconds'
                     ELSE interval '2 seconds' + r_run * interval '18 seconds' END AS run
    FROM (
        SELECT i, random() AS r_tenant, random() AS r_age, random() AS r_wait, random() AS r_run,
               random() AS r_hook,
               CASE WHEN r_type < 0.40 THEN 'segmentation' WHEN r_type < 0.70 THEN 'text_to_image'
                    WHEN r_type < 0.80 THEN 'inpainting' WHEN r_type < 0.88 THEN 'style_transfer'
                    WHEN r_type < 0.98 THEN 'diagnostic' ELSE 'finetune' END AS type,
               CASE WHEN i <= %(queued)s THEN 'queued' WHEN i <= %(queued)s + %(running)s THEN 'running'
                    WHEN r_status < 0.06 THEN 'failed' WHEN r_status < 0.10 THEN 'canceled'
                    ELSE 'succeeded' END AS status
        FROM (SELECT i, random() AS r_type, random() AS r_status FROM generate_series(1, %(jobs)s) i) draws
    ) drawn
) job
ORDER BY created
"""

EVENTS = """
INSERT INTO job_events (job_id, at, kind, attempt, message, data)
SELECT j.id, e.at, e.kind, CASE WHEN e.kind IN ('queued', 'dispatched') THEN 0 ELSE 1 END, e.message, NULL
FROM jobs j
CROSS JOIN LATERAL (VALUES
    (1, 'queued', j.created_at, NULL, true),
    (2, 'dispatched', j.dispatched_at, 'dispatched', true),
    (3, 'claimed', j.started_at, 'claimed by scale-worker-1', j.started_at IS NOT NULL),
    (4, 'progress', j.started_at + (j.finished_at - j.started_at) / 2, 'step 1 of 2',
        j.status = 'succeeded' AND j.type <> 'segmentation' AND j.type <> 'diagnostic'),
    (5, j.status, j.finished_at, NULL, j.finished_at IS NOT NULL)
) AS e(n, kind, at, message, keep)
WHERE e.keep
ORDER BY j.created_at, j.id, e.n
"""

ARTIFACTS = """
INSERT INTO artifacts (job_id, name, content_type, size, sha256, storage_key, created_at)
SELECT j.id, a.name, a.content_type, a.size, md5(j.id || a.name) || md5(a.name || j.id),
       'jobs/' || j.id || '/' || a.name, j.finished_at
FROM jobs j
CROSS JOIN LATERAL (VALUES
    (1, 'output.json', 'application/json', 2048, true),
    (2, 'image.png', 'image/png', 786432, j.type <> 'diagnostic' AND hashtext(j.id) %% 2 = 0)
) AS a(n, name, content_type, size, keep)
WHERE j.status = 'succeeded' AND a.keep
ORDER BY j.finished_at, j.id, a.n
"""

DELIVERIES = """
INSERT INTO webhook_deliveries (id, job_id, event, sequence, payload, status, attempts, series_started_at,
                                series_first_attempt, next_attempt_at, last_error, created_at, delivered_at)
SELECT 'msg_' || substr(md5('delivery:' || j.id), 1, 22), j.id, 'completed', 0,
       json_build_object('id', j.id, 'status', j.status), d.status, 1, j.finished_at, 1,
       CASE WHEN d.status = 'pending' THEN now() + interval '10 minutes' END,
       CASE WHEN d.status <> 'delivered' THEN 'HTTP 503' END,
       j.finished_at,
       CASE WHEN d.status = 'delivered' THEN j.finished_at + interval '150 milliseconds' END
FROM jobs j
CROSS JOIN LATERAL (SELECT CASE WHEN hashtext(j.id) %% 100 = 0 THEN 'pending'
                                WHEN hashtext(j.id) %% 100 = 1 THEN 'gave_up'
                                ELSE 'delivered' END AS status) d
WHERE j.webhook IS NOT NULL AND j.finished_at IS NOT NULL
ORDER BY j.finished_at
"""

ATTEMPTS = """
INSERT INTO webhook_attempts (delivery_id, number, at, status_code, response_excerpt, error, duration_seconds)
SELECT id, 1, created_at, CASE WHEN status = 'delivered' THEN 200 ELSE 503 END, '', NULL, 0.15
FROM webhook_deliveries ORDER BY created_at
"""

WORKERS = """
INSERT INTO workers (id, hostname, pid, queues, device, models, current_jobs, started_at, last_seen_at)
SELECT 'scale-worker-' || w, 'scale-host-' || w, 1000 + w, '["gpu", "train", "webhooks", "maintenance"]'::json,
       '{"kind": "cpu"}'::json, '{}'::json, '[]'::json, now() - interval '1 day', now()
FROM generate_series(1, 4) w
"""

STEPS = (
    ("tenants", TENANTS),
    ("keys", KEYS),
    ("jobs", JOBS),
    ("job_events", EVENTS),
    ("artifacts", ARTIFACTS),
    ("webhook_deliveries", DELIVERIES),
    ("webhook_attempts", ATTEMPTS),
    ("workers", WORKERS),
)

# What a live system keeps fresh: leases renewed, heartbeats sent, the queued jobs' messages waiting in the
# broker (dispatched recently). Run before every timing, so a reconcile pass finds nothing to repair however
# long ago the data were loaded (``--reuse``).
FRESHEN = (
    "UPDATE jobs SET lease_expires_at = now() + interval '1 hour' WHERE status = 'running'",
    "UPDATE jobs SET dispatched_at = now() WHERE status = 'queued' AND dispatched_at IS NOT NULL",
    "UPDATE workers SET last_seen_at = now() WHERE id LIKE 'scale-worker-%%'",
)


def load(conninfo: str, jobs: int, tenants: int, seed: str, rate: float = 1400.0, backlog: int = 300) -> dict[str, int]:
    """Fill an empty, migrated database; the rows written per table."""
    queued = min(backlog, jobs // 10)
    params = {
        "jobs": jobs,
        "tenants": tenants,
        "seed": seed,
        "span": jobs / rate,  # hours of history
        "queued": queued,
        "running": queued // 5,
    }
    counts: dict[str, int] = {}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET work_mem = '256MB'")
        conn.execute("SET maintenance_work_mem = '512MB'")
        for table, sql in STEPS:
            cursor = conn.execute(sql, params)  # type: ignore[arg-type]
            counts[table] = cursor.rowcount
            log(f"loaded {cursor.rowcount:,} {table}")
        conn.execute("VACUUM ANALYZE")
    return counts


def loaded_jobs(conninfo: str) -> int:
    """How many jobs the loader wrote there before (0: none, or no such schema yet)."""
    with psycopg.connect(conninfo) as conn:
        try:
            row = conn.execute("SELECT count(*) FROM jobs WHERE tenant_id LIKE 'ten_scale%%'").fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return int(row[0]) if row else 0


def freshen(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for sql in FRESHEN:
            conn.execute(sql)
