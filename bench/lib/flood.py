"""A flood of parked ``Prefer: wait`` reads against one API, and another tenant's submits measured beside it.

Shared by the wait-flood test (``tests/integration/test_wait_flood.py``: one round, correctness and generous
bounds) and the benchmark (``bench/wait_flood.py``: rounds, medians and the during/idle ratio).

The waits are asyncio streams on one thread of this (unpatched) process, so that hundreds of them cost one
thread; the submits and ``/healthz`` probes are plain blocking requests from the calling thread.
"""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from dataclasses import dataclass, field

import psutil
import requests

from bench.lib.stats import median, percentile

SUBMIT = {"type": "text_to_image", "input": {"prompt": "a lighthouse"}}
REQUEST_TIMEOUT = 60.0


@dataclass
class Flood:
    """One ``GET /v1/jobs/<id>`` with ``Prefer: wait=<wait_seconds>`` per target, run by an event loop on a
    thread of its own; ``written`` is set once every request was sent (or failed)."""

    base_url: str
    targets: list[tuple[str, str]]  # (key, job id), one per wait
    wait_seconds: int
    written: threading.Event = field(default_factory=threading.Event)
    results: list[tuple[int, float, bytes]] = field(default_factory=list)  # (status, seconds, head and body)
    errors: list[str] = field(default_factory=list)

    async def _one(self, key: str, job_id: str, sent: list[int]) -> None:
        host, port = self.base_url.removeprefix("http://").split(":")
        started = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 20)
            request = (
                f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                f"Prefer: wait={self.wait_seconds}\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode())
            await writer.drain()
            self._sent(sent)
            answer = await asyncio.wait_for(reader.read(), self.wait_seconds + 30)
            writer.close()
            status = int(answer.split(b" ", 2)[1])
            self.results.append((status, time.monotonic() - started, answer))
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            self._sent(sent)

    def _sent(self, sent: list[int]) -> None:
        sent.append(1)
        if len(sent) == len(self.targets):
            self.written.set()

    async def _all(self) -> None:
        sent: list[int] = []
        await asyncio.gather(*(self._one(key, job_id, sent) for key, job_id in self.targets))

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=lambda: asyncio.run(self._all()), name="wait-flood", daemon=True)
        thread.start()
        return thread

    def problems(self) -> list[str]:
        """What is wrong with the answers, once the thread ended: every wait must have answered 200 with the
        job still ``queued`` after its full wait (so it was parked all along), and none may have failed."""
        found = []
        if self.errors:
            found.append(f"{len(self.errors)} waits failed: {self.errors[:5]}")
        if len(self.results) + len(self.errors) != len(self.targets):
            found.append(f"{len(self.results) + len(self.errors)} of {len(self.targets)} waits ended")
        statuses = sorted({status for status, _, _ in self.results})
        if statuses != [200]:
            found.append(f"wait statuses: {statuses}")
        early_or_late = [s for _, s, _ in self.results if not self.wait_seconds - 0.5 <= s < self.wait_seconds + 20]
        if early_or_late:
            found.append(f"{len(early_or_late)} waits did not last their {self.wait_seconds}s: {early_or_late[:5]}")
        if not all(b'"status":"queued"' in answer for _, _, answer in self.results):
            found.append("a wait answered another status than queued")
        return found

    def answered_after(self) -> str:
        seconds = [s for _, s, _ in self.results]
        return f"{min(seconds):.1f}–{max(seconds):.1f}s" if seconds else "n/a"


@dataclass
class Round:
    """One round's figures: submits and probes idle, the same while the flood is parked, and the timings."""

    idle: list[float]
    idle_health: list[float]
    during: list[float]
    during_health: list[float]
    parked_after: float  # seconds from the last wait sent to the API going idle
    measured_by: float  # seconds from the flood's start to the end of the during phase
    flood: Flood

    def report(self) -> str:
        return (
            f"  submits idle:    {summary(self.idle)}\n  submits during:  {summary(self.during)}\n"
            f"  /healthz idle:   {summary(self.idle_health)}\n  /healthz during: {summary(self.during_health)}\n"
            f"  the API went idle {self.parked_after:.1f}s after the last wait was sent; measured by "
            f"{self.measured_by:.1f}s; waits answered after {self.flood.answered_after()}"
        )


def flood_round(
    base_url: str,
    api_pid: int,
    client: requests.Session,
    other_key: str,
    targets: list[tuple[str, str]],
    wait_seconds: int,
    samples: int,
    probes: int,
) -> Round:
    """Idle submits and probes, then the same while a flood of waits is parked (once the API has read them
    all and gone idle), then the flood's answers (the thread joined; check ``flood.problems()``)."""
    idle = submit_latencies(client, base_url, other_key, samples)
    idle_health = health_latencies(client, base_url, probes)
    flood = Flood(base_url, targets, wait_seconds)
    started = time.monotonic()
    thread = flood.start()
    if not flood.written.wait(30):
        raise RuntimeError("the waits could not be sent within 30 s")
    parked_after = until_idle(api_pid, timeout=20)  # every request read, authenticated and parked
    during = submit_latencies(client, base_url, other_key, samples)
    during_health = health_latencies(client, base_url, probes)
    measured_by = time.monotonic() - started
    thread.join(wait_seconds + 40)
    if thread.is_alive():
        raise RuntimeError(f"the waits did not end {wait_seconds + 40}s after they were sent")
    return Round(idle, idle_health, during, during_health, parked_after, measured_by, flood)


def queue_jobs(client: requests.Session, base_url: str, keys: list[str], per_key: int) -> dict[str, list[str]]:
    """``per_key`` jobs submitted with each key (nobody runs them: they stay queued); their ids by key."""
    jobs: dict[str, list[str]] = {}
    for key in keys:
        for _ in range(per_key):
            created = client.post(
                f"{base_url}/v1/jobs", json=SUBMIT, headers={"Authorization": f"Bearer {key}"}, timeout=REQUEST_TIMEOUT
            )
            if created.status_code != 202:
                raise RuntimeError(f"submit answered {created.status_code}: {created.text[:300]}")
            jobs.setdefault(key, []).append(created.json()["id"])
    return jobs


def submit_latencies(client: requests.Session, base_url: str, key: str, count: int) -> list[float]:
    """``count`` sequential submits' seconds each; any answer but 202 stops it with the answer."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.post(
            f"{base_url}/v1/jobs", json=SUBMIT, headers={"Authorization": f"Bearer {key}"}, timeout=REQUEST_TIMEOUT
        )
        latencies.append(time.perf_counter() - started)
        if response.status_code != 202:
            raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")
    return latencies


def health_latencies(client: requests.Session, base_url: str, count: int) -> list[float]:
    """``count`` sequential ``GET /healthz``' seconds each; any answer but 200 stops it."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get(f"{base_url}/healthz", timeout=5)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"/healthz answered {response.status_code}: {response.text[:300]}")
    return latencies


def until_idle(master_pid: int, timeout: float) -> float:
    """Wait until the API's processes use under 5 % of a CPU over half a second; the seconds it took."""
    master = psutil.Process(master_pid)
    processes = [master, *master.children(recursive=True)]
    started = time.monotonic()
    before = sum(p.cpu_times().user + p.cpu_times().system for p in processes)
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        now = sum(p.cpu_times().user + p.cpu_times().system for p in processes)
        if now - before < 0.025:
            return time.monotonic() - started
        before = now
    raise RuntimeError(f"the API was still busy {timeout:g}s after the waits were sent")


def enough_open_files(needed: int) -> None:
    """Raise this process's open-files limit to ``needed`` (up to the hard limit), or say why it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        raise RuntimeError(f"open-files limit {soft} < {needed}: raise `ulimit -n`")


def summary(values: list[float]) -> str:
    """``median …, p90 …, max …`` in milliseconds."""
    if not values:
        return "no samples"
    return (
        f"median {median(values) * 1000:.1f} ms, p90 {percentile(values, 90) * 1000:.1f} ms, "
        f"max {max(values) * 1000:.1f} ms"
    )
