"""Queue overhead: what gpujobs costs per job compared with bare Celery and a hand-written service.

Run from the repository root (nothing to configure on this machine)::

    . .venv/bin/activate && python -m bench.queue_overhead

Three systems, all in one run on the same Redis, database and S3 server:

- **gpujobs**: the real API (``gpujobs api``: gunicorn, gevent) and a real worker
  (``gpujobs worker --queues gpu,maintenance``), running the ``diagnostic`` job at zero sleep
  (``steps=1``): auth, validation, job row + event, commit, broker send, claim with lease,
  artifact to S3 (put + size check), success + events, finish notification.
- **hand-written** (``bench/baseline_app.py``): a Flask route (same gunicorn settings) that
  inserts a row and calls ``.delay()``; a Celery task that puts one small object to S3 and
  updates the row. What a user would write without gpujobs.
- **bare Celery**: a trivial task, ``apply_async`` + ``.get()`` through the Redis result
  backend: the floor.

Phases (figures printed as medians, p99 and ratios):

(a) submissions/s: ``--clients`` threads in this process, each with its own ``requests.Session``
    (keep-alive; ``--http http.client`` for a lighter client), send ``--submissions`` jobs
    between them, with no worker consuming (the API path alone; the queues are purged
    afterwards). Bare Celery: ``apply_async`` (``ignore_result``) from the same number of threads.
(b) submit → succeeded, sequential single client (the systems interleaved sample by sample):
    ``wait``: one ``POST`` that holds the answer until the job finished (gpujobs:
    ``Prefer: wait=N``, Redis pub/sub; hand-written: ``?wait=N``, ``AsyncResult.get``);
    ``poll``: ``POST``, then back-to-back ``GET``s of the job until it reads ``succeeded``.
(c) the same under load: ``--clients`` threads doing ``wait`` round trips at once; also jobs/s.

(a) and (c) run the systems in turn, ``--rounds`` times over, so that a change in the machine's
load (other work) hits them alike; (b) interleaves them sample by sample.

CPU seconds of every process involved (this client, the API servers, the workers, PostgreSQL,
Redis, S3) are read (psutil, per process tree) around each phase and printed per job.

The services, set up and torn down by ``bench.deployment``: ``--database-url``, else a fresh
PostgreSQL database on 127.0.0.1:5432 when one answers (else SQLite in a temp dir); ``--broker-url``,
else Redis on 127.0.0.1:6379 db 13 when it answers (else an embedded one); ``--s3-endpoint``, else an
embedded SeaweedFS S3 server. On them: the two APIs, then (after phase (a)) the two workers.

Every process the script starts is stopped at the end (and on Ctrl-C); a database it created
is dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.deployment import DEFAULT_API_COMMAND, READY_TIMEOUT, Deployment, redis_client, run
from bench.lib.client import SESSIONS, UNFINISHED, HandClient, JobsClient
from bench.lib.cpu import CpuMeter
from bench.lib.load import STOP, Op, Sample, run_interleaved, run_rounds
from bench.lib.profiler import Profiler
from bench.lib.report import log, machine, ratio
from gpujobs.harness.databases import REDIS_HOST, REDIS_PORT
from gpujobs.harness.ports import free_port
from gpujobs.harness.servers import EmbeddedS3, redis_answers

DEFAULT_REDIS = f"redis://{REDIS_HOST}:{REDIS_PORT}/13"
DEFAULT_WORKER_COMMAND = "{python} -m gpujobs worker --queues {queues}"
S3_BUCKET = "gpujobs-bench"
BASELINE_BUCKET = "gpujobs-bench-baseline"
GPUJOBS_QUEUES = ("gpu", "maintenance")
BASELINE_QUEUES = ("bench_bare", "bench_hand")
DIAGNOSTIC = {"type": "diagnostic", "input": {"sleep_seconds": 0, "steps": 1}}
WAIT_SECONDS = 30
CPU_ROLES = ["client", "gpujobs api", "baseline api", "gpujobs worker", "baseline worker", "postgres", "redis", "s3"]


# --- the baseline's deployment --------------------------------------------------------------------


def baseline_settings(deployment: Deployment) -> dict[str, str]:
    """``bench/baseline_app.py``'s configuration: the same database, broker and S3 server, its own bucket."""
    settings = {
        "BENCH_DATABASE_URL": deployment.database_url,
        "BENCH_BROKER_URL": deployment.broker_url,
        "BENCH_S3_ENDPOINT": deployment.s3_endpoint,
        "BENCH_S3_BUCKET": BASELINE_BUCKET,
    }
    if deployment.s3_access_key:
        settings["BENCH_S3_ACCESS_KEY"] = deployment.s3_access_key
    if deployment.s3_secret_key:
        settings["BENCH_S3_SECRET_KEY"] = deployment.s3_secret_key
    return settings


def purge(queues: tuple[str, ...]) -> int:
    from bench.baseline_app import celery_app

    with celery_app.connection_for_write() as conn:
        return sum(conn.default_channel.queue_purge(q) or 0 for q in queues)


def client_admin_keys(database_url: str, admin_key: str, count: int) -> list[str]:
    """``admin_key`` and ``count - 1`` more admin keys of its tenant."""
    from db.keys import create_key, hash_key
    from db.models import ApiKey, Role
    from db.session import dispose_engines, session_scope

    keys = [admin_key]
    with session_scope(database_url) as session:
        row = session.query(ApiKey).filter_by(key_hash=hash_key(admin_key)).one()
        for number in range(1, count):
            keys.append(create_key(session, f"queue-overhead client {number}", Role.ADMIN, row.tenant_id)[1])
    dispose_engines()
    return keys


def cancel_waiting(database_url: str) -> int:
    """Cancel every queued job (phase (a) left them; no worker ran any): the number canceled."""
    from sqlalchemy import update

    from db.models import Job, JobStatus, utcnow
    from db.session import dispose_engines, session_scope

    with session_scope(database_url) as session:
        done = session.execute(
            update(Job)
            .where(Job.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.CANCELED.value, finished_at=utcnow())
        )
        count = done.rowcount
    dispose_engines()
    return count


def forget_broker_keys(broker_url: str, redis_was_empty: bool) -> None:
    """Only what this run made: its queues, its results, and (on a database that was empty) kombu's bookkeeping
    keys; nothing else in that Redis database is touched."""
    purge(GPUJOBS_QUEUES + BASELINE_QUEUES)
    client = redis_client(broker_url)
    patterns = ["celery-task-meta-*"] + [f"_kombu.binding*.{q}" for q in BASELINE_QUEUES]
    if redis_was_empty:
        patterns += ["_kombu.binding*", "unacked*"]
    for pattern in patterns:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])


def api_settings() -> tuple[int, int]:
    """The API servers' processes, and the hand-written API's threads: `gpujobs api`'s defaults (its
    gthread threads); gpujobs serves with its default gevent workers, the hand-written app with gthread,
    as a Flask route glued to Celery usually is."""
    try:
        from gpujobs import cli

        return int(getattr(cli, "DEFAULT_API_WORKERS", 2)), int(getattr(cli, "DEFAULT_API_THREADS", 8))
    except Exception:  # the CLI is being edited; the defaults are what it had
        return 2, 8


# --- operations -----------------------------------------------------------------------------------


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def spans(body: dict[str, Any]) -> dict[str, float]:
    """Server-side spans from a finished job's own timestamps (same machine, same clock).

    gpujobs: ``queue`` = created_at → started_at (commit, broker send, delivery, claim),
    ``run`` = started_at → finished_at (the run, the S3 put, success recorded).
    hand-written: ``server`` = created_at → finished_at of its row.
    """
    created, started, finished = (_ts(body.get(k)) for k in ("created_at", "started_at", "finished_at"))
    out: dict[str, float] = {}
    if created and started and finished:
        out = {"queue": (started - created).total_seconds(), "run": (finished - started).total_seconds()}
    elif created and finished:
        out = {"server": (finished - created).total_seconds()}
    return out


def round_trip_wait(client: Any) -> tuple[bool, dict[str, float]]:
    body = client.submit(DIAGNOSTIC, wait=WAIT_SECONDS)
    return body["status"] == "succeeded", spans(body)


def round_trip_poll(client: Any) -> tuple[bool, dict[str, float]]:
    deadline = time.monotonic() + WAIT_SECONDS
    body = client.submit(DIAGNOSTIC)
    gets = 0
    while body["status"] in UNFINISHED and time.monotonic() < deadline:
        body = client.get(body["id"])
        gets += 1
    return body["status"] == "succeeded", {"gets": float(gets)}


def submit_only(client: Any) -> tuple[bool, dict[str, float]]:
    return client.submit(DIAGNOSTIC)["status"] == "queued", {}


def celery_round_trip(_: Any) -> tuple[bool, dict[str, float]]:
    from bench.baseline_app import noop

    return noop.apply_async(args=[1]).get(timeout=WAIT_SECONDS) == 1, {}


def celery_send(_: Any) -> tuple[bool, dict[str, float]]:
    from bench.baseline_app import noop

    noop.apply_async(args=[1], ignore_result=True)
    return True, {}


# --- the run --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--database-url",
        help="default: a fresh PostgreSQL database on 127.0.0.1:5432 if it answers, else SQLite in a temp dir",
    )
    parser.add_argument("--broker-url", help=f"default: {DEFAULT_REDIS} if it answers, else an embedded Redis")
    parser.add_argument("--s3-endpoint", help="default: an embedded SeaweedFS S3 server")
    parser.add_argument("--s3-access-key")
    parser.add_argument("--s3-secret-key")
    parser.add_argument("--submissions", type=int, default=2000, help="per system, phase (a) (default 2000)")
    parser.add_argument("--latency-samples", type=int, default=300, help="per system and mode, phase (b) (default 300)")
    parser.add_argument(
        "--load-samples", type=int, help="per system, phase (c) (default: --latency-samples x 2; 0 skips)"
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads in (a) and (c) (default 8)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="(a) and (c) alternate the systems this many times (default 3)"
    )
    parser.add_argument(
        "--http",
        choices=sorted(SESSIONS),
        default="requests",
        help="HTTP client of the client threads: requests.Session (default) or a lean http.client connection",
    )
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured operations before each phase (default 30)")
    parser.add_argument(
        "--gpujobs-api-command",
        help=f"run another gpujobs API build, to compare a change (default {DEFAULT_API_COMMAND!r}; "
        "placeholders {python} {port}; it must serve 127.0.0.1:{port}; the bucket and schema are made here)",
    )
    parser.add_argument(
        "--gpujobs-worker-command",
        help=f"likewise for the worker (default {DEFAULT_WORKER_COMMAND!r}; placeholders {{python}} {{queues}}; "
        "it must log ' ready.' when it consumes)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the children's logs")
    parser.add_argument(
        "--py-spy", help="path of py-spy: record the APIs and workers during (a) and (c) (perturbs the figures)"
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gpujobs-bench-profiles",
        help="where --py-spy writes collapsed stacks (default: $TMPDIR/gpujobs-bench-profiles)",
    )
    args = parser.parse_args(argv)
    args.load_samples = args.latency_samples * 2 if args.load_samples is None else args.load_samples
    command = " ".join(["python -m bench.queue_overhead", *(argv if argv is not None else sys.argv[1:])])

    def measure_until_stopped(deployment: Deployment) -> dict[str, Any]:
        try:
            return measure(args, command, deployment)
        finally:
            STOP.set()  # client threads stop before the servers do

    return run("queue-overhead", measure_until_stopped, report, args.json, args.keep_logs)


def measure(args: argparse.Namespace, command: str, deployment: Deployment) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    session = SESSIONS[args.http]
    broker_url = args.broker_url or (DEFAULT_REDIS if redis_answers(REDIS_PORT, REDIS_HOST) else None)
    deployment.start_services(args.database_url, broker_url, args.s3_endpoint, args.s3_access_key, args.s3_secret_key)
    redis_was_empty = deployment.broker_url.startswith("redis") and redis_client(deployment.broker_url).dbsize() == 0
    deployment.at_stop(lambda: forget_broker_keys(deployment.broker_url, redis_was_empty))
    # This process talks to the same services (migrations, keys, bare Celery, purges).
    admin_key = deployment.prepare(S3_BUCKET, baseline_settings(deployment), "queue-overhead benchmark")
    assert deployment.stack is not None
    # The service runs with its default settings, the per-key request limit (6,000 a minute) included, as a
    # user's deployment does; so each client thread is a key of its own, as concurrent users would be (one
    # tenant: the diagnostic type needs an admin key, and each key has the limit on its own).
    client_keys = itertools.cycle(client_admin_keys(deployment.database_url, admin_key, args.clients))

    from bench import baseline_app

    deployment.at_stop(baseline_app.engine.dispose)
    baseline_app.metadata.create_all(baseline_app.engine)
    with contextlib.suppress(Exception):
        baseline_app._s3().create_bucket(Bucket=BASELINE_BUCKET)

    meter = CpuMeter(deployment.database_url.rsplit("/", 1)[1] if deployment.database.is_postgres else None)
    for server in deployment.servers:
        meter.add(server.process.pid, "s3" if isinstance(server, EmbeddedS3) else "redis")

    workers, threads = api_settings()
    gj_api, gj_base = deployment.start_api(args.gpujobs_api_command, name="gpujobs-api")
    bl_port = free_port()
    gunicorn = [
        sys.executable,
        "-m",
        "gunicorn",
        "--worker-class",
        "gthread",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--bind",
        f"127.0.0.1:{bl_port}",
        "--graceful-timeout",
        "10",
        "--keep-alive",
        "5",
    ]
    if Path("/dev/shm").is_dir():
        gunicorn += ["--worker-tmp-dir", "/dev/shm"]
    bl_base = f"http://127.0.0.1:{bl_port}"
    bl_api = deployment.stack.start("baseline-api", [*gunicorn, "bench.baseline_app:app"])
    bl_api.wait_for_http(f"{bl_base}/healthz", READY_TIMEOUT)
    meter.add(gj_api.pid, "gpujobs api")
    meter.add(bl_api.pid, "baseline api")
    log(
        f"APIs up: gpujobs {gj_base} (gunicorn gevent, {workers} workers), "
        f"hand-written {bl_base} (gunicorn gthread, {workers} x {threads})"
    )

    profiler = Profiler(args.py_spy, args.profile_dir if args.py_spy else None)
    profiler.targets |= {"gpujobs api": gj_api.pid, "hand-written api": bl_api.pid}

    def gpujobs() -> JobsClient:
        return JobsClient(gj_base, next(client_keys), session())

    def hand() -> HandClient:
        return HandClient(bl_base, session())

    def no_state() -> None:
        return None

    # (a) submissions/s, no worker consuming
    log(f"(a) {args.submissions} submissions per system, {args.clients} client threads, no worker consuming")
    throughput = run_rounds(
        "a",
        [
            ("bare Celery", celery_send, no_state),
            ("hand-written", submit_only, hand),
            ("gpujobs", submit_only, gpujobs),
        ],
        args.submissions,
        args.clients,
        args.rounds,
        args.warmup * args.clients,
        meter,
        profiler.record,
    )
    for label, sample in throughput.items():
        log(f"    {label}: {sample.rate:.0f}/s ({sample.errors} errors)")
    log(f"    purged {purge(GPUJOBS_QUEUES + BASELINE_QUEUES)} unconsumed messages")
    # gpujobs keeps what the workers cannot take yet in the database (the scheduler): without this, phase
    # (a)'s jobs would be the backlog that phases (b) and (c) wait behind once the workers start.
    log(f"    canceled the {cancel_waiting(deployment.database_url)} gpujobs jobs left queued")

    # Workers
    from db.settings import get_settings

    concurrency = str(get_settings().worker_concurrency)
    worker_command = (args.gpujobs_worker_command or DEFAULT_WORKER_COMMAND).format(
        python=shlex.quote(sys.executable), queues=",".join(GPUJOBS_QUEUES)
    )
    gj_worker = deployment.stack.start("gpujobs-worker", shlex.split(worker_command))
    bl_worker = deployment.stack.start(
        "baseline-worker",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.baseline_app:celery_app",
            "worker",
            "-Q",
            ",".join(BASELINE_QUEUES),
            "--pool",
            "threads",
            "--concurrency",
            concurrency,
            "--hostname",
            f"bench-baseline-{os.getpid()}@%h",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
        ],
    )
    meter.add(gj_worker.pid, "gpujobs worker")
    meter.add(bl_worker.pid, "baseline worker")
    profiler.targets |= {"gpujobs worker": gj_worker.pid, "hand-written worker": bl_worker.pid}
    for worker in (gj_worker, bl_worker):
        worker.wait_for_log(" ready.", READY_TIMEOUT)
    log(f"workers up (Celery thread pool, concurrency {concurrency} each)")

    # (b) latency, sequential, interleaved
    log(f"(b) {args.latency_samples} sequential round trips per system and mode (interleaved)")
    gs, hs = gpujobs(), hand()
    latency = run_interleaved(
        [
            ("bare Celery: apply_async + .get()", celery_round_trip, None),
            ("hand-written: POST ?wait (AsyncResult.get)", round_trip_wait, hs),
            ("hand-written: POST + GET polling", round_trip_poll, hs),
            ("gpujobs: POST Prefer: wait", round_trip_wait, gs),
            ("gpujobs: POST + GET polling", round_trip_poll, gs),
        ],
        args.latency_samples,
        args.warmup,
    )
    for s in latency:
        log(f"    {s.name}: median {s.median_ms:.2f} ms, p99 {s.p99_ms:.2f} ms ({s.errors} errors)")

    # (c) latency under load
    load: dict[str, Sample] = {}
    if args.load_samples:
        log(f"(c) {args.load_samples} round trips per system, {args.clients} concurrent clients")
        waits: list[tuple[str, Op, Any]] = [
            ("bare Celery", celery_round_trip, no_state),
            ("hand-written", round_trip_wait, hand),
            ("gpujobs", round_trip_wait, gpujobs),
        ]
        load = run_rounds("c", waits, args.load_samples, args.clients, args.rounds, args.warmup, meter, profiler.record)
        for label, sample in load.items():
            log(f"    {label}: {sample.rate:.0f} jobs/s, median {sample.median_ms:.1f} ms ({sample.errors} errors)")

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_before": load_before,
        "command": command,
        "machine": machine(),
        "services": {
            "database": deployment.database_label,
            "broker": deployment.broker_label,
            "s3": deployment.s3_label,
        },
        "settings": {
            "clients": args.clients,
            "http_client": args.http,
            "rounds": args.rounds,
            "submissions": args.submissions,
            "latency_samples": args.latency_samples,
            "load_samples": args.load_samples,
            "api": f"gpujobs: gunicorn gevent, {workers} workers; hand-written: gthread {workers} x {threads} threads",
            "worker": f"Celery thread pool, concurrency {concurrency}",
            "gpujobs_api_command": args.gpujobs_api_command or DEFAULT_API_COMMAND,
            "gpujobs_worker_command": args.gpujobs_worker_command or DEFAULT_WORKER_COMMAND,
        },
        "throughput": {k: v.as_dict() for k, v in throughput.items()},
        "latency": {s.name: s.as_dict() for s in latency},
        "load": {k: v.as_dict() for k, v in load.items()},
    }


# --- the report -----------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    """The figures as tables, from the results alone (so also from a run's JSON)."""
    settings = results["settings"]
    throughput, latency, load = results["throughput"], results["latency"], results["load"]
    out: list[str] = []
    p = out.append
    p("")
    p(f"Queue overhead: diagnostic job (sleep_seconds=0, steps=1), {results['date']}")
    p(f"command:  {results['command']}")
    p(f"machine:  {results['machine']}")
    for k, v in results["services"].items():
        p(f"{k + ':':9} {v}")
    p(f"API:      {settings['api']} (both APIs); workers: {settings['worker']} (both)")
    commands = settings["gpujobs_api_command"], settings["gpujobs_worker_command"]
    if commands != (DEFAULT_API_COMMAND, DEFAULT_WORKER_COMMAND):
        p(f"gpujobs run as: {commands[0]}")
        p(f"           and: {commands[1]}")
    busy = "  (other work was running: expect noisy, pessimistic figures)" if results["load_before"] > 1.0 else ""
    p(f"load average (1 min) before the run: {results['load_before']:.2f}{busy}")
    p("")
    client_kind = "requests.Session" if settings["http_client"] == "requests" else "http.client connection"
    p(f"(a) Submissions/s: {settings['clients']} client threads in one process ({client_kind} each, keep-alive),")
    p(
        f"    {settings['submissions']} submissions per system in {settings['rounds']} alternating rounds, "
        "no worker consuming"
    )
    p(f"    {'system':<14}{'subs/s':>9}{'submit median':>15}{'p99':>9}{'errors':>8}")
    for name, s in throughput.items():
        p(f"    {name:<14}{s['per_second']:>9.0f}{s['median_ms']:>12.2f} ms{s['p99_ms']:>6.2f} ms{s['errors']:>8}")
    g, h, b = (throughput[k]["per_second"] for k in ("gpujobs", "hand-written", "bare Celery"))
    p(f"    gpujobs / hand-written: {ratio(g, h)} the throughput;  gpujobs / bare Celery: {ratio(g, b)}")
    p(f"    aim >= 300 submissions/s: {'MET' if g >= 300 else 'MISSED'} ({g:.0f}/s)")
    p("")
    p(
        "(b) Submit -> succeeded as seen by the client, one sequential client, "
        f"{settings['latency_samples']} samples each"
    )
    p("    wait = one POST held until the job ends; poll = POST then back-to-back GETs until `succeeded`")
    p(f"    {'system / mode':<46}{'median':>10}{'p99':>10}{'mean':>10}{'GETs/job':>10}{'errors':>8}")
    for name, s in latency.items():
        gets = f"{s['mean_gets_per_job']:.1f}" if "mean_gets_per_job" in s else "-"
        mean = s["mean_ms"] if s["mean_ms"] is not None else float("nan")
        p(f"    {name:<46}{s['median_ms']:>7.2f} ms{s['p99_ms']:>7.2f} ms{mean:>7.2f} ms{gets:>10}{s['errors']:>8}")
    bare = latency["bare Celery: apply_async + .get()"]
    for mode, gname, hname in [
        ("wait", "gpujobs: POST Prefer: wait", "hand-written: POST ?wait (AsyncResult.get)"),
        ("poll", "gpujobs: POST + GET polling", "hand-written: POST + GET polling"),
    ]:
        gs, hs = latency[gname], latency[hname]
        p(
            f"    {mode}: gpujobs / hand-written median {ratio(gs['median_ms'], hs['median_ms'])}, "
            f"p99 {ratio(gs['p99_ms'], hs['p99_ms'])};  gpujobs / bare Celery median "
            f"{ratio(gs['median_ms'], bare['median_ms'])}, p99 {ratio(gs['p99_ms'], bare['p99_ms'])}"
        )
    gw, hw = latency["gpujobs: POST Prefer: wait"], latency["hand-written: POST ?wait (AsyncResult.get)"]
    within = gw["median_ms"] / hw["median_ms"] if hw["median_ms"] else float("nan")
    verdict = "MET" if within <= 1.5 else "MISSED"
    p(f"    aim: median within 1.5x of hand-written (wait mode): {verdict} ({within:.2f}x)")
    p("    where the wait-mode time goes (medians, from each job's own timestamps; 'outside' = total - server spans):")
    for name in ("hand-written: POST ?wait (AsyncResult.get)", "gpujobs: POST Prefer: wait"):
        parts = {k.removesuffix("_median_ms"): v for k, v in latency[name].items() if k.endswith("_median_ms")}
        if parts:
            named = ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items())
            p(f"      {name}: {named}, outside {latency[name]['median_ms'] - sum(parts.values()):.2f} ms")
    p("      (gpujobs queue = created_at -> started_at: commit, broker send, delivery, claim;")
    p("       run = started_at -> finished_at: the job, its S3 put, the artifact row, success recorded;")
    p("       hand-written server = its row's created_at -> finished_at)")
    if load:
        p("")
        p(
            f"(c) Under load: {settings['clients']} concurrent clients doing wait round trips, "
            f"{next(iter(load.values()))['n']} jobs per system"
        )
        p(f"    {'system':<14}{'jobs/s':>9}{'median':>10}{'p99':>10}{'errors':>8}")
        for name, s in load.items():
            p(f"    {name:<14}{s['per_second']:>9.0f}{s['median_ms']:>7.1f} ms{s['p99_ms']:>7.1f} ms{s['errors']:>8}")
        g, h, b = (load[k] for k in ("gpujobs", "hand-written", "bare Celery"))
        p(
            f"    gpujobs / hand-written: jobs/s {ratio(g['per_second'], h['per_second'])}, "
            f"median {ratio(g['median_ms'], h['median_ms'])};  gpujobs / bare Celery: jobs/s "
            f"{ratio(g['per_second'], b['per_second'])}, median {ratio(g['median_ms'], b['median_ms'])}"
        )
    p("")
    p("CPU milliseconds per operation, by process (psutil; 2 cores = 2000 ms of CPU per second)")
    p(f"    {'phase / system':<24}" + "".join(f"{r:>11}" for r in CPU_ROLES) + f"{'total':>9}")
    phases = [("(a) " + k, v) for k, v in throughput.items()] + [("(c) " + k, v) for k, v in load.items()]
    for name, s in phases:
        per_op = s.get("cpu_ms_per_op", {})
        cells = "".join(f"{per_op.get(r, 0.0):>11.2f}" for r in CPU_ROLES)
        p(f"    {name:<24}{cells}{sum(per_op.values()):>9.2f}")
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
