"""Queue overhead: what gpujobs costs per job compared with bare Celery and a hand-written service.

Run from the repository root (nothing to configure on this machine)::

    . .venv/bin/activate && python -m bench.queue_overhead

Three systems, all in one run on the same Redis, database and S3 server:

- **gpujobs**: the real API (``gpujobs api``: gunicorn, gthread) and a real worker
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
Redis, S3) are read from /proc around each phase and printed per job.

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
import http.client
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from bench.deployment import (
    DEFAULT_API_COMMAND,
    REPO,
    Deployment,
    cpu_model,
    interrupt_on,
    log,
    redis_answers,
    redis_client,
)
from gpujobs.harness.ports import free_port

DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
S3_BUCKET = "gpujobs-bench"
BASELINE_BUCKET = "gpujobs-bench-baseline"
GPUJOBS_QUEUES = ("gpu", "maintenance")
BASELINE_QUEUES = ("bench_bare", "bench_hand")
DIAGNOSTIC = {"type": "diagnostic", "input": {"sleep_seconds": 0, "steps": 1}}
FINISHED = {"succeeded", "failed", "canceled"}
WAIT_SECONDS = 30
REQUEST_TIMEOUT = 60.0


STOP = threading.Event()  # set on Ctrl-C / SIGTERM: client threads stop before the servers do
_error_logs: dict[str, int] = {}
_error_lock = threading.Lock()


# --- statistics ----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Sample:
    """Timings of one measured series (seconds)."""

    name: str
    times: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float | None = None  # for concurrent phases: first start to last end
    extra: dict[str, list[float]] = field(default_factory=dict)  # e.g. GETs per polled job, server-side spans
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by process group over the phase

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1000 if self.times else float("nan")

    @property
    def p99_ms(self) -> float:
        return percentile(self.times, 99) * 1000

    @property
    def rate(self) -> float:
        return len(self.times) / self.wall if self.wall else float("nan")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": len(self.times),
            "errors": self.errors,
            "median_ms": round(self.median_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "mean_ms": round(statistics.fmean(self.times) * 1000, 3) if self.times else None,
        }
        if self.wall:
            out |= {"wall_s": round(self.wall, 3), "per_second": round(self.rate, 1)}
        for key, values in self.extra.items():
            if key == "gets":
                out["mean_gets_per_job"] = round(statistics.fmean(values), 2)
            else:
                out[f"{key}_median_ms"] = round(statistics.median(values) * 1000, 3)
        if self.cpu:
            n = max(1, len(self.times))
            out["cpu_ms_per_op"] = {k: round(v * 1000 / n, 3) for k, v in self.cpu.items()}
        return out


# --- CPU accounting from /proc --------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuMeter:
    """CPU seconds (user + system) of the processes involved, grouped by role."""

    def __init__(self) -> None:
        self.groups: dict[int, str] = {}  # process group id -> role
        self.database_name: str | None = None
        self.embedded_redis = False

    def snapshot(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read().decode(errors="replace")
            except OSError:
                continue
            comm = stat[stat.find("(") + 1 : stat.rfind(")")]
            fields = stat[stat.rfind(")") + 2 :].split()
            pid, pgrp = int(entry.name), int(fields[2])
            seconds = (int(fields[11]) + int(fields[12])) / CLK_TCK
            role = None
            if pid == me:
                role = "client"
            elif pgrp in self.groups:
                role = self.groups[pgrp]
            elif comm == "postgres" and self._our_postgres(pid):
                role = "postgres"
            elif comm == "redis-server":
                role = "redis"
            if role:
                totals[role] = totals.get(role, 0.0) + seconds
        return totals

    def _our_postgres(self, pid: int) -> bool:
        """Backends of our database, and the shared background processes (WAL writer, ...)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().decode(errors="replace")
        except OSError:
            return False
        if self.database_name is None:
            return True
        if self.database_name in cmdline:
            return True
        # Background processes carry no database name; client backends carry "user db host(port)".
        return "(" not in cmdline and "postgres:" in cmdline

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        roles = sorted(set(before) | set(after))
        return {r: max(0.0, after.get(r, 0.0) - before.get(r, 0.0)) for r in roles}


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


def forget_broker_keys(broker_url: str, redis_was_empty: bool) -> None:
    """Only what this run made: its queues, its results, and (on a database that was empty) kombu's bookkeeping
    keys; nothing else in that Redis database is touched."""
    purge(broker_url, GPUJOBS_QUEUES + BASELINE_QUEUES)
    client = redis_client(broker_url)
    patterns = ["celery-task-meta-*"] + [f"_kombu.binding*.{q}" for q in BASELINE_QUEUES]
    if redis_was_empty:
        patterns += ["_kombu.binding*", "unacked*"]
    for pattern in patterns:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])


# --- clients --------------------------------------------------------------------------------------


class LeanResponse:
    def __init__(self, status: int, data: bytes) -> None:
        self.status_code, self.content = status, data

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.text[:300]}")


class LeanSession:
    """``--http http.client``: one keep-alive ``http.client`` connection, a few times cheaper than requests.

    Only what the benchmark uses of ``requests.Session``: ``headers``, ``get`` and ``post``.
    """

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self._conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, url: str, body: bytes | None, headers: dict[str, str] | None, params: Any) -> LeanResponse:
        parts = urllib.parse.urlsplit(url)
        path = parts.path + (f"?{urllib.parse.urlencode(params)}" if params else "")
        all_headers = {**self.headers, **(headers or {})}
        if body is not None:
            all_headers["Content-Type"] = "application/json"
        for attempt in (1, 2):  # a keep-alive connection the server closed is opened again once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=REQUEST_TIMEOUT)
            try:
                self._conn.request(method, path, body=body, headers=all_headers)
                response = self._conn.getresponse()
                return LeanResponse(response.status, response.read())
            except (http.client.HTTPException, ConnectionError):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def post(self, url: str, json: Any = None, headers: dict[str, str] | None = None, params: Any = None, timeout: float | None = None) -> LeanResponse:  # noqa: A002
        return self._request("POST", url, _json_bytes(json), headers, params)

    def get(self, url: str, timeout: float | None = None) -> LeanResponse:
        return self._request("GET", url, None, None, None)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


HTTP_CLIENTS: dict[str, Callable[[], Any]] = {"requests": requests.Session, "http.client": LeanSession}
http_session: Callable[[], Any] = requests.Session


class GpujobsClient:
    name = "gpujobs"

    def __init__(self, base: str, key: str) -> None:
        self.base, self.key = base, key

    def session(self) -> Any:
        s = http_session()
        s.headers["Authorization"] = f"Bearer {self.key}"
        return s

    def submit(self, s: Any, wait: int = 0) -> dict[str, Any]:
        headers = {"Prefer": f"wait={wait}"} if wait else None
        r = s.post(f"{self.base}/v1/jobs", json=DIAGNOSTIC, headers=headers, timeout=REQUEST_TIMEOUT)
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text[:300]}")
        return r.json()  # type: ignore[no-any-return]

    def get(self, s: Any, job_id: str) -> dict[str, Any]:
        r = s.get(f"{self.base}/v1/jobs/{job_id}", timeout=REQUEST_TIMEOUT)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]


class HandClient:
    name = "hand-written"

    def __init__(self, base: str) -> None:
        self.base = base

    def session(self) -> Any:
        return http_session()

    def submit(self, s: Any, wait: int = 0) -> dict[str, Any]:
        params = {"wait": wait} if wait else None
        r = s.post(f"{self.base}/jobs", params=params, json=DIAGNOSTIC, timeout=REQUEST_TIMEOUT)
        if r.status_code != 202:
            raise RuntimeError(f"POST /jobs answered {r.status_code}: {r.text[:300]}")
        return r.json()  # type: ignore[no-any-return]

    def get(self, s: Any, job_id: str) -> dict[str, Any]:
        r = s.get(f"{self.base}/jobs/{job_id}", timeout=REQUEST_TIMEOUT)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]


# An operation: (per-thread state) -> (ok, extra figures); timed by the caller.
Op = Callable[[Any], tuple[bool, dict[str, float]]]


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


def round_trip_wait(client: Any) -> Op:
    def op(s: Any) -> tuple[bool, dict[str, float]]:
        body = client.submit(s, wait=WAIT_SECONDS)
        return body["status"] == "succeeded", spans(body)

    return op


def round_trip_poll(client: Any) -> Op:
    def op(s: Any) -> tuple[bool, dict[str, float]]:
        deadline = time.monotonic() + WAIT_SECONDS
        body = client.submit(s)
        gets = 0
        while body["status"] not in FINISHED and time.monotonic() < deadline:
            body = client.get(s, body["id"])
            gets += 1
        return body["status"] == "succeeded", {"gets": float(gets)}

    return op


def submit_only(client: Any) -> Op:
    def op(s: Any) -> tuple[bool, dict[str, float]]:
        return client.submit(s)["status"] == "queued", {}

    return op


def celery_round_trip(s: Any) -> tuple[bool, dict[str, float]]:
    from bench.baseline_app import noop

    return noop.apply_async(args=[1]).get(timeout=WAIT_SECONDS) == 1, {}


def celery_send(s: Any) -> tuple[bool, dict[str, float]]:
    from bench.baseline_app import noop

    noop.apply_async(args=[1], ignore_result=True)
    return True, {}


def timed(op: Op, state: Any, sample: Sample) -> None:
    t0 = time.perf_counter()
    try:
        ok, extra = op(state)
    except Exception as exc:  # counted, reported (the first few); the run goes on
        sample.errors += 1
        with _error_lock:
            shown = _error_logs[sample.name] = _error_logs.get(sample.name, 0) + 1
        if shown <= 3 and not STOP.is_set():
            log(f"{sample.name}: {type(exc).__name__}: {str(exc)[:200]}")
        return
    elapsed = time.perf_counter() - t0
    if ok:
        sample.times.append(elapsed)
        for key, value in extra.items():
            sample.extra.setdefault(key, []).append(value)
    else:
        sample.errors += 1


class Profiler:
    """Optional py-spy recordings (collapsed stacks) of the API and worker processes during a phase."""

    def __init__(self, py_spy: str | None, out_dir: Path | None) -> None:
        self.py_spy, self.out_dir = py_spy, out_dir
        self.targets: dict[str, int] = {}  # label -> pid (a gunicorn master: its workers are included)

    @contextlib.contextmanager
    def record(self, phase: str, system: str) -> Any:
        if not (self.py_spy and self.out_dir):
            yield
            return
        from gpujobs.harness import processes

        self.out_dir.mkdir(parents=True, exist_ok=True)
        recorders = []
        for label, pid in self.targets.items():
            if not label.startswith(system):
                continue
            out = self.out_dir / f"{phase}-{label.replace(' ', '-')}.txt"
            args = [self.py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--gil",
                    "--rate", "250", "--format", "raw", "--output", str(out)]  # fmt: skip
            recorders.append(processes.start_process(args, self.out_dir / "py-spy.log"))
        time.sleep(0.5 if recorders else 0)  # let py-spy attach
        try:
            yield
        finally:
            for proc in recorders:
                proc.send_signal(signal.SIGINT)
            for proc in recorders:
                with contextlib.suppress(Exception):
                    proc.wait(15)
                processes.stop_process(proc)


def run_concurrent(
    name: str, op: Op, make_state: Callable[[], Any], clients: int, total: int, meter: CpuMeter
) -> Sample:
    """``clients`` threads share ``total`` operations; wall time is from the start signal to the last end."""
    sample = Sample(name)
    lock = threading.Lock()
    remaining = [total]
    barrier = threading.Barrier(clients + 1)

    def worker() -> None:
        state = make_state()
        local = Sample(name)
        barrier.wait()
        while not STOP.is_set():
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            timed(op, state, local)
        with lock:
            sample.times.extend(local.times)
            for key, values in local.extra.items():
                sample.extra.setdefault(key, []).extend(values)
            sample.errors += local.errors

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    cpu_before = meter.snapshot()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    sample.wall = time.perf_counter() - t0
    sample.cpu = CpuMeter.delta(cpu_before, meter.snapshot())
    return sample


def run_rounds(
    phase: str,
    systems: list[tuple[str, Op, Callable[[], Any]]],
    total: int,
    clients: int,
    rounds: int,
    warmup: int,
    meter: CpuMeter,
    profiler: Profiler,
) -> dict[str, Sample]:
    """Each system in turn, ``rounds`` times over, so a change in the machine's load hits all of them alike.

    Rates are all operations over the summed wall time of the system's rounds.
    """
    merged = {label: Sample(label, wall=0.0) for label, _, _ in systems}
    for label, op, make_state in systems:
        run_concurrent(label, op, make_state, clients, warmup, meter)
    for r in range(rounds):
        count = total // rounds + (1 if r < total % rounds else 0)
        for label, op, make_state in systems:
            with profiler.record(phase, label) if r == 0 else contextlib.nullcontext():
                s = run_concurrent(label, op, make_state, clients, count, meter)
            m = merged[label]
            m.times += s.times
            for key, values in s.extra.items():
                m.extra.setdefault(key, []).extend(values)
            m.errors += s.errors
            m.wall = (m.wall or 0.0) + (s.wall or 0.0)
            for role, seconds in s.cpu.items():
                m.cpu[role] = m.cpu.get(role, 0.0) + seconds
    return merged


def run_interleaved(series: list[tuple[str, Op, Any]], count: int, warmup: int) -> list[Sample]:
    """One client: each round runs one operation of every series, so all see the same conditions."""
    for _ in range(warmup):
        for name, op, state in series:
            timed(op, state, Sample(name))
    samples = [Sample(name) for name, _, _ in series]
    for _ in range(count):
        if STOP.is_set():
            break
        for sample, (_, op, state) in zip(samples, series):
            timed(op, state, sample)
    return samples


# --- the run --------------------------------------------------------------------------------------


def purge(broker_url: str, queues: tuple[str, ...]) -> int:
    from bench.baseline_app import celery_app

    with celery_app.connection_for_write() as conn:
        return sum(conn.default_channel.queue_purge(q) or 0 for q in queues)


DEFAULT_WORKER_COMMAND = "{python} -m gpujobs worker --queues {queues}"


def api_settings() -> tuple[int, int]:
    try:
        from gpujobs import cli

        return int(getattr(cli, "DEFAULT_API_WORKERS", 2)), int(getattr(cli, "DEFAULT_API_THREADS", 8))
    except Exception:  # the CLI is being edited; the defaults are what it had
        return 2, 8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="default: a fresh PostgreSQL database on 127.0.0.1:5432 if it answers, else SQLite in a temp dir")
    parser.add_argument("--broker-url", help=f"default: {DEFAULT_REDIS} if it answers, else an embedded Redis")
    parser.add_argument("--s3-endpoint", help="default: an embedded SeaweedFS S3 server")
    parser.add_argument("--s3-access-key")
    parser.add_argument("--s3-secret-key")
    parser.add_argument("--submissions", type=int, default=2000, help="per system, phase (a) (default 2000)")
    parser.add_argument("--latency-samples", type=int, default=300, help="per system and mode, phase (b) (default 300)")
    parser.add_argument("--load-samples", type=int, help="per system, phase (c) (default: --latency-samples x 2; 0 skips)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads in (a) and (c) (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="(a) and (c) alternate the systems this many times (default 3)")
    parser.add_argument(
        "--http",
        choices=sorted(HTTP_CLIENTS),
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
    parser.add_argument("--py-spy", help="path of py-spy: record the APIs and workers during (a) and (c) (perturbs the figures)")
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gpujobs-bench-profiles",
        help="where --py-spy writes collapsed stacks (default: $TMPDIR/gpujobs-bench-profiles)",
    )
    args = parser.parse_args(argv)
    load_samples = args.latency_samples * 2 if args.load_samples is None else args.load_samples
    global http_session
    http_session = HTTP_CLIENTS[args.http]

    # SIGTERM and SIGINT (even where the shell started us with SIGINT ignored) unwind as KeyboardInterrupt,
    # so the finally below stops everything.
    interrupt_on(signal.SIGTERM, signal.SIGINT)
    load_before = os.getloadavg()[0]
    deployment = Deployment.new("queue-overhead")
    redis_was_empty: bool | None = None  # None: nothing of this run is in the broker yet
    failed = True
    started = time.monotonic()
    try:
        broker_url = args.broker_url or (DEFAULT_REDIS if redis_answers(DEFAULT_REDIS) else None)
        deployment.start_services(args.database_url, broker_url, args.s3_endpoint, args.s3_access_key, args.s3_secret_key)
        redis_was_empty = deployment.broker_url.startswith("redis") and redis_client(deployment.broker_url).dbsize() == 0
        sys.path.insert(0, str(REPO))
        # This process talks to the same services (migrations, keys, bare Celery, purges).
        env, admin_key = deployment.prepare(S3_BUCKET, baseline_settings(deployment), "queue-overhead benchmark")

        from bench import baseline_app

        baseline_app.metadata.create_all(baseline_app.engine)
        s3 = baseline_app._s3()
        with contextlib.suppress(Exception):
            s3.create_bucket(Bucket=BASELINE_BUCKET)

        meter = CpuMeter()
        meter.database_name = deployment.created_database
        for part in deployment.embedded:
            meter.groups[part.process.pid] = "s3" if hasattr(part, "endpoint_url") else "redis"

        workers, threads = api_settings()
        gj_base = deployment.start_api(env, args.gpujobs_api_command, name="gpujobs-api")
        bl_port = free_port()
        gunicorn = [
            sys.executable, "-m", "gunicorn",
            "--worker-class", "gthread", "--workers", str(workers), "--threads", str(threads),
            "--bind", f"127.0.0.1:{bl_port}", "--graceful-timeout", "10", "--keep-alive", "5",
        ]  # fmt: skip
        if Path("/dev/shm").is_dir():
            gunicorn += ["--worker-tmp-dir", "/dev/shm"]
        bl_base = f"http://127.0.0.1:{bl_port}"
        bl_api = deployment.start("baseline-api", [*gunicorn, "bench.baseline_app:app"], env)
        deployment.wait_for_http("baseline-api", f"{bl_base}/healthz")
        gj_api = deployment.processes["gpujobs-api"]
        meter.groups[gj_api.pid] = "gpujobs api"
        meter.groups[bl_api.pid] = "baseline api"
        log(f"APIs up: gpujobs {gj_base}, hand-written {bl_base} (gunicorn gthread, {workers} x {threads})")

        profiler = Profiler(args.py_spy, args.profile_dir if args.py_spy else None)
        profiler.targets |= {"gpujobs api": gj_api.pid, "hand-written api": bl_api.pid}
        gj = GpujobsClient(gj_base, admin_key)
        hand = HandClient(bl_base)

        # (a) submissions/s, no worker consuming
        log(f"(a) {args.submissions} submissions per system, {args.clients} client threads, no worker consuming")
        throughput = run_rounds(
            "a",
            [
                ("bare Celery", celery_send, lambda: None),
                ("hand-written", submit_only(hand), hand.session),
                ("gpujobs", submit_only(gj), gj.session),
            ],
            args.submissions,
            args.clients,
            args.rounds,
            args.warmup * args.clients,
            meter,
            profiler,
        )
        for label, sample in throughput.items():
            log(f"    {label}: {sample.rate:.0f}/s ({sample.errors} errors)")
        purged = purge(deployment.broker_url, GPUJOBS_QUEUES + BASELINE_QUEUES)
        log(f"    purged {purged} unconsumed messages")

        # Workers
        from db.settings import get_settings

        concurrency = str(get_settings().worker_concurrency)
        worker_command = (args.gpujobs_worker_command or DEFAULT_WORKER_COMMAND).format(
            python=shlex.quote(sys.executable), queues=",".join(GPUJOBS_QUEUES)
        )
        gj_worker = deployment.start("gpujobs-worker", shlex.split(worker_command), env)
        bl_worker = deployment.start(
            "baseline-worker",
            [
                sys.executable, "-m", "celery", "-A", "bench.baseline_app:celery_app", "worker",
                "-Q", ",".join(BASELINE_QUEUES), "--pool", "threads", "--concurrency", concurrency,
                "--hostname", f"bench-baseline-{os.getpid()}@%h", "--loglevel", "INFO",
                "--without-mingle", "--without-gossip",
            ],
            env,
        )  # fmt: skip
        meter.groups[gj_worker.pid] = "gpujobs worker"
        meter.groups[bl_worker.pid] = "baseline worker"
        profiler.targets |= {"gpujobs worker": gj_worker.pid, "hand-written worker": bl_worker.pid}
        deployment.wait_for_log("gpujobs-worker")
        deployment.wait_for_log("baseline-worker")
        log(f"workers up (Celery thread pool, concurrency {concurrency} each)")

        # (b) latency, sequential, interleaved
        log(f"(b) {args.latency_samples} sequential round trips per system and mode (interleaved)")
        gs, hs = gj.session(), hand.session()
        latency = run_interleaved(
            [
                ("bare Celery: apply_async + .get()", celery_round_trip, None),
                ("hand-written: POST ?wait (AsyncResult.get)", round_trip_wait(hand), hs),
                ("hand-written: POST + GET polling", round_trip_poll(hand), hs),
                ("gpujobs: POST Prefer: wait", round_trip_wait(gj), gs),
                ("gpujobs: POST + GET polling", round_trip_poll(gj), gs),
            ],
            args.latency_samples,
            args.warmup,
        )
        for s in latency:
            log(f"    {s.name}: median {s.median_ms:.2f} ms, p99 {s.p99_ms:.2f} ms ({s.errors} errors)")

        # (c) latency under load
        load: dict[str, Sample] = {}
        if load_samples:
            log(f"(c) {load_samples} round trips per system, {args.clients} concurrent clients")
            load = run_rounds(
                "c",
                [
                    ("bare Celery", celery_round_trip, lambda: None),
                    ("hand-written", round_trip_wait(hand), hand.session),
                    ("gpujobs", round_trip_wait(gj), gj.session),
                ],
                load_samples,
                args.clients,
                args.rounds,
                args.warmup,
                meter,
                profiler,
            )
            for label, sample in load.items():
                log(f"    {label}: {sample.rate:.0f} jobs/s, median {sample.median_ms:.1f} ms ({sample.errors} errors)")

        results = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_before": load_before,
            "command": " ".join(["python -m bench.queue_overhead", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(),
            "services": {"database": deployment.database_label, "broker": deployment.broker_label, "s3": deployment.s3_label},
            "settings": {
                "clients": args.clients,
                "http_client": args.http,
                "rounds": args.rounds,
                "submissions": args.submissions,
                "latency_samples": args.latency_samples,
                "load_samples": load_samples,
                "api": f"gunicorn gthread {workers} workers x {threads} threads",
                "worker": f"Celery thread pool, concurrency {concurrency}",
                "gpujobs_api_command": args.gpujobs_api_command or DEFAULT_API_COMMAND,
                "gpujobs_worker_command": args.gpujobs_worker_command or DEFAULT_WORKER_COMMAND,
            },
            "throughput": {k: v.as_dict() for k, v in throughput.items()},
            "latency": {s.name: s.as_dict() for s in latency},
            "load": {k: v.as_dict() for k, v in load.items()},
        }
        report(results, throughput, latency, load, args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
            log(f"figures written to {args.json}")
        failed = False
        return 0
    finally:
        STOP.set()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        deployment.stop_processes()  # workers first, then the APIs
        if redis_was_empty is not None:
            with contextlib.suppress(Exception):
                forget_broker_keys(deployment.broker_url, redis_was_empty)
        with contextlib.suppress(Exception):
            from bench import baseline_app

            baseline_app.engine.dispose()
        deployment.stop(keep_logs=args.keep_logs or failed)
        log(f"done in {time.monotonic() - started:.0f} s; every process this run started is stopped")


def machine() -> str:
    return f"{os.cpu_count()} cores ({cpu_model()}), no GPU, Linux {platform.release()}, Python {platform.python_version()}"


# --- the report -----------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def report(
    results: dict[str, Any],
    throughput: dict[str, Sample],
    latency: list[Sample],
    load: dict[str, Sample],
    args: argparse.Namespace,
) -> None:
    out: list[str] = []
    p = out.append
    p("")
    p(f"Queue overhead: diagnostic job (sleep_seconds=0, steps=1), {results['date']}")
    p(f"command:  {results['command']}")
    p(f"machine:  {results['machine']}")
    for k, v in results["services"].items():
        p(f"{k + ':':9} {v}")
    p(f"API:      {results['settings']['api']} (both APIs); workers: {results['settings']['worker']} (both)")
    if args.gpujobs_api_command or args.gpujobs_worker_command:
        p(f"gpujobs run as: {args.gpujobs_api_command or DEFAULT_API_COMMAND}")
        p(f"           and: {args.gpujobs_worker_command or DEFAULT_WORKER_COMMAND}")
    p(
        f"load average (1 min) before the run: {results['load_before']:.2f}"
        + ("  (other work was running: expect noisy, pessimistic figures)" if results["load_before"] > 1.0 else "")
    )
    p("")
    client_kind = "requests.Session" if args.http == "requests" else "http.client connection"
    p(f"(a) Submissions/s: {args.clients} client threads in one process ({client_kind} each, keep-alive),")
    p(f"    {args.submissions} submissions per system in {args.rounds} alternating rounds, no worker consuming")
    p(f"    {'system':<14}{'subs/s':>9}{'submit median':>15}{'p99':>9}{'errors':>8}")
    for name, s in throughput.items():
        p(f"    {name:<14}{s.rate:>9.0f}{s.median_ms:>12.2f} ms{s.p99_ms:>6.2f} ms{s.errors:>8}")
    g, h, b = throughput["gpujobs"], throughput["hand-written"], throughput["bare Celery"]
    p(f"    gpujobs / hand-written: {_ratio(g.rate, h.rate)} the throughput;  gpujobs / bare Celery: {_ratio(g.rate, b.rate)}")
    p(f"    aim >= 300 submissions/s: {'MET' if g.rate >= 300 else 'MISSED'} ({g.rate:.0f}/s)")
    p("")
    p(f"(b) Submit -> succeeded as seen by the client, one sequential client, {args.latency_samples} samples each")
    p("    wait = one POST held until the job ends; poll = POST then back-to-back GETs until `succeeded`")
    p(f"    {'system / mode':<46}{'median':>10}{'p99':>10}{'mean':>10}{'GETs/job':>10}{'errors':>8}")
    for s in latency:
        gets = f"{statistics.fmean(s.extra['gets']):.1f}" if "gets" in s.extra else "-"
        mean = statistics.fmean(s.times) * 1000 if s.times else float("nan")
        p(f"    {s.name:<46}{s.median_ms:>7.2f} ms{s.p99_ms:>7.2f} ms{mean:>7.2f} ms{gets:>10}{s.errors:>8}")
    by = {s.name: s for s in latency}
    bare = by["bare Celery: apply_async + .get()"]
    for mode, gname, hname in [
        ("wait", "gpujobs: POST Prefer: wait", "hand-written: POST ?wait (AsyncResult.get)"),
        ("poll", "gpujobs: POST + GET polling", "hand-written: POST + GET polling"),
    ]:
        gs, hs = by[gname], by[hname]
        p(
            f"    {mode}: gpujobs / hand-written median {_ratio(gs.median_ms, hs.median_ms)}, p99 {_ratio(gs.p99_ms, hs.p99_ms)};"
            f"  gpujobs / bare Celery median {_ratio(gs.median_ms, bare.median_ms)}, p99 {_ratio(gs.p99_ms, bare.p99_ms)}"
        )
    gw, hw = by["gpujobs: POST Prefer: wait"], by["hand-written: POST ?wait (AsyncResult.get)"]
    ratio = gw.median_ms / hw.median_ms if hw.median_ms else float("nan")
    p(f"    aim: median within 1.5x of hand-written (wait mode): {'MET' if ratio <= 1.5 else 'MISSED'} ({ratio:.2f}x)")
    p("    where the wait-mode time goes (medians, from each job's own timestamps; 'outside' = total - server spans):")
    for s in (hw, gw):
        parts = {k: statistics.median(v) * 1000 for k, v in s.extra.items() if k != "gets"}
        if parts:
            outside = s.median_ms - sum(parts.values())
            named = ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items())
            p(f"      {s.name}: {named}, outside {outside:.2f} ms")
    p("      (gpujobs queue = created_at -> started_at: commit, broker send, delivery, claim;")
    p("       run = started_at -> finished_at: the job, its S3 put, the artifact row, success recorded;")
    p("       hand-written server = its row's created_at -> finished_at)")
    if load:
        p("")
        p(f"(c) Under load: {args.clients} concurrent clients doing wait round trips, {len(next(iter(load.values())).times)} jobs per system")
        p(f"    {'system':<14}{'jobs/s':>9}{'median':>10}{'p99':>10}{'errors':>8}")
        for name, s in load.items():
            p(f"    {name:<14}{s.rate:>9.0f}{s.median_ms:>7.1f} ms{s.p99_ms:>7.1f} ms{s.errors:>8}")
        g, h, b = load["gpujobs"], load["hand-written"], load["bare Celery"]
        p(
            f"    gpujobs / hand-written: jobs/s {_ratio(g.rate, h.rate)}, median {_ratio(g.median_ms, h.median_ms)};"
            f"  gpujobs / bare Celery: jobs/s {_ratio(g.rate, b.rate)}, median {_ratio(g.median_ms, b.median_ms)}"
        )
    p("")
    p("CPU milliseconds per operation, by process (from /proc; 2 cores = 2000 ms of CPU per second)")
    roles = ["client", "gpujobs api", "baseline api", "gpujobs worker", "baseline worker", "postgres", "redis", "s3"]
    p(f"    {'phase / system':<24}" + "".join(f"{r:>11}" for r in roles) + f"{'total':>9}")
    phases = [("(a) " + k, v) for k, v in throughput.items()] + [("(c) " + k, v) for k, v in load.items()]
    for name, s in phases:
        n = max(1, len(s.times))
        cells = "".join(f"{s.cpu.get(r, 0.0) * 1000 / n:>11.2f}" for r in roles)
        p(f"    {name:<24}{cells}{sum(s.cpu.values()) * 1000 / n:>9.2f}")
    print("\n".join(out), flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
