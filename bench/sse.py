"""SSE: what 200 open job event streams cost another tenant's submits on one API process, and how long a
worker's saved progress takes to reach the streams.

Run from the repository root (nothing to configure on this machine)::

    . .venv/bin/activate && python -m bench.sse            # about a minute with the defaults

One ``gpujobs api --workers 1`` (gunicorn, gevent) on a fresh deployment (``bench.deployment``). ``--tenants``
tenants queue ``--jobs-per-tenant`` jobs each; this process then plays the worker: it claims them
(``db.transitions.claim``) and saves progress with the worker's own statement (``transitions.renew_lease``
with progress, then commit: the Redis change notice is sent by the same after-commit hook as in a worker).

1. idle: another tenant sends ``--samples`` sequential submits;
2. ``--streams`` streams (``Accept: text/event-stream``, asyncio on one thread of this process) are spread
   over the jobs; once every stream has its ``claimed`` event and the API is idle, the same submits again
   (streams parked);
3. live: ``--ticks`` progress saves of every job, ``--tick-seconds`` apart, while the same submits run; each
   stream's ``progress`` event is timed from the start of the save of its job (the added latency);
4. the jobs are canceled (the worker's ``transitions.cancel``): every stream must end with its ``job`` event;
5. idle again: the same submits, pooled with the first idle ones (the machine's load drifts between phases).

Printed: submit medians idle, parked and live, their ratios, the progress latency (median, p99, max) and
the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import requests

from bench.deployment import Deployment, run
from bench.lib.flood import enough_open_files, queue_jobs, submit_latencies, summary, until_idle
from bench.lib.report import machine
from bench.lib.stats import median, percentile
from bench.wait_flood import tenant_keys


class Streams:
    """``Accept: text/event-stream`` reads of ``targets`` (key, job id) on an event loop of their own thread."""

    def __init__(self, base_url: str, targets: list[tuple[str, str]]) -> None:
        self.base_url, self.targets = base_url, targets
        self.claimed = 0  # streams that received their job's `claimed` event
        self.ended = 0  # streams that received the `job` event and the end of the body
        self.progress: dict[tuple[str, int], list[float]] = defaultdict(list)  # (job, step) → arrival times
        self.errors: list[str] = []
        self.lock = threading.Lock()

    async def _one(self, key: str, job_id: str) -> None:
        host, port = self.base_url.removeprefix("http://").split(":")
        try:
            reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
            writer.write(
                f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                "Accept: text/event-stream\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            status = (await reader.readline()).split(b" ", 2)[1]
            if status != b"200":
                raise RuntimeError(f"status {status.decode()}")
            name = ""
            while line := await reader.readline():  # chunked framing lines are skipped: they match nothing
                text = line.decode().rstrip("\r\n")
                if text.startswith("event: "):
                    name = text[7:]
                elif text.startswith("data: "):
                    arrived = time.monotonic()
                    data = json.loads(text[6:])
                    with self.lock:
                        if name == "claimed":
                            self.claimed += 1
                        elif name == "progress":
                            self.progress[(job_id, data["progress"]["step"])].append(arrived)
                        elif name == "job":
                            self.ended += 1
            writer.close()
        except Exception as exc:
            self.errors.append(f"{job_id}: {type(exc).__name__}: {exc}")

    def start(self) -> threading.Thread:
        async def main() -> None:
            await asyncio.gather(*(self._one(key, job) for key, job in self.targets))

        thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        thread.start()
        return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=200, help="concurrent event streams (default 200)")
    parser.add_argument("--tenants", type=int, default=4, help="tenants the streams are spread over (default 4)")
    parser.add_argument("--jobs-per-tenant", type=int, default=5, help="running jobs per tenant (default 5)")
    parser.add_argument("--ticks", type=int, default=20, help="progress saves of every job (default 20)")
    parser.add_argument("--tick-seconds", type=float, default=0.5, help="time between two saves (default 0.5)")
    parser.add_argument("--samples", type=int, default=60, help="submits per phase (default 60)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the children's logs")
    args = parser.parse_args(argv)
    if min(args.streams, args.tenants, args.jobs_per_tenant, args.ticks, args.samples) < 1:
        parser.error("--streams, --tenants, --jobs-per-tenant, --ticks and --samples must be at least 1")
    command = " ".join(["python -m bench.sse", *(argv if argv is not None else sys.argv[1:])])
    return run("sse", lambda deployment: measure(args, command, deployment), report, args.json, args.keep_logs)


def measure(args: argparse.Namespace, command: str, deployment: Deployment) -> dict[str, Any]:
    enough_open_files(args.streams * 2 + 256)
    load_before = os.getloadavg()
    deployment.start_services()
    per_key = -(-args.streams // args.tenants)
    deployment.prepare("gpujobs-bench-sse", {"GPUJOBS_MAX_STREAMS_PER_KEY": str(per_key)}, "sse")
    assert deployment.stack is not None
    api, base_url = deployment.stack.start_api(workers=1)
    keys = tenant_keys(deployment.database_url, args.tenants + 1)
    stream_keys, other = keys[:-1], keys[-1]
    client = requests.Session()
    jobs = queue_jobs(client, base_url, stream_keys, args.jobs_per_tenant)
    submit_latencies(client, base_url, other, 5)  # warm up
    idle = submit_latencies(client, base_url, other, args.samples)

    from db import notify, transitions
    from db.session import session_scope

    notify.install()  # as in a worker: the change notice leaves after the commit
    every_job = [job for key in stream_keys for job in jobs[key]]
    with session_scope(deployment.database_url) as session:
        for job_id in every_job:
            assert transitions.claim(session, job_id, "bench-worker", 3600) is not None
    targets = [(key, jobs[key][i % args.jobs_per_tenant]) for key in stream_keys for i in range(per_key)]
    targets = targets[: args.streams]
    streams = Streams(base_url, targets)
    thread = streams.start()
    deadline = time.monotonic() + 60
    while streams.claimed < len(targets):
        if streams.errors or time.monotonic() > deadline:
            raise RuntimeError(f"{streams.claimed}/{len(targets)} streams started; {streams.errors[:5]}")
        time.sleep(0.1)
    until_idle(api.pid, timeout=30)
    parked = submit_latencies(client, base_url, other, args.samples)

    saved: dict[tuple[str, int], float] = {}

    def tick() -> None:
        for step in range(1, args.ticks + 1):
            started = time.monotonic()
            for job_id in every_job:
                saved[(job_id, step)] = time.monotonic()
                with session_scope(deployment.database_url) as session:
                    transitions.renew_lease(session, job_id, 1, 3600, {"step": step, "total": args.ticks})
            time.sleep(max(0.0, args.tick_seconds - (time.monotonic() - started)))

    ticker = threading.Thread(target=tick)
    ticker.start()
    live = submit_latencies(client, base_url, other, args.samples)
    ticker.join()
    time.sleep(2)  # the last events arrive
    with session_scope(deployment.database_url) as session:
        for job_id in every_job:
            transitions.cancel(session, job_id, 1, "the benchmark is over")
    thread.join(30)
    if streams.errors or streams.ended != len(targets):
        raise RuntimeError(f"{streams.ended}/{len(targets)} streams ended; {streams.errors[:5]}")
    idle += submit_latencies(client, base_url, other, args.samples)  # idle again: before and after, pooled
    latencies = [t - saved[k] for k, arrivals in streams.progress.items() if k in saved for t in arrivals]
    expected = len(targets) * args.ticks
    return {
        "command": command,
        "machine": machine(),
        "services": f"{deployment.database_label}; {deployment.broker_label}; {deployment.s3_label}",
        "streams": len(targets),
        "jobs": len(every_job),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "submit_idle": idle,
        "submit_parked": parked,
        "submit_live": live,
        "progress_latency": latencies,
        "progress_expected": expected,
    }


def report(results: dict[str, Any]) -> None:
    idle, parked, live = results["submit_idle"], results["submit_parked"], results["submit_live"]
    latency = results["progress_latency"]
    print(
        f"\nSSE: {results['streams']} concurrent event streams over {results['jobs']} running jobs, one gevent process"
    )
    print(f"command: {results['command']}\nmachine: {results['machine']}\nservices: {results['services']}")
    print(
        "load average (1, 5, 15 min): before "
        + ", ".join(f"{x:.2f}" for x in results["load_before"])
        + "; after "
        + ", ".join(f"{x:.2f}" for x in results["load_after"])
    )
    print(f"submits idle (before and after): {summary(idle)}")
    print(f"submits, streams parked: {summary(parked)}  ({median(parked) / median(idle):.2f}× idle)")
    print(f"submits, progress live:  {summary(live)}  ({median(live) / median(idle):.2f}× idle)")
    print(
        f"progress save → stream event: {len(latency)}/{results['progress_expected']} events, median "
        f"{median(latency) * 1000:.1f} ms, p99 {percentile(latency, 99) * 1000:.1f} ms, max {max(latency) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
