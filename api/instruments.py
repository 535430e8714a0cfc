"""The API's own metrics: HTTP requests by route, and ``GET /metrics`` summing every server process.

Why a hook per request and not a WSGI middleware: the route label must be the URL rule
(``/v1/jobs/<job:job_id>``), never the raw path (one series per job id would grow without end), and
only Flask knows the rule. The hook costs two clock reads and two label look-ups per request.

gunicorn runs several worker processes, and a scrape reaches one of them. ``gpujobs api`` sets
``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory per listening address, wiped at start) before
gunicorn starts, so every process writes its counters to files there, ``api.gunicorn_conf`` marks a
dead worker's files, and ``GET /metrics`` answers the sum over all of them (prometheus_client's
multiprocess mode). ``process_*`` then describe the whole server: the gunicorn arbiter and its live
workers, CPU seconds including the workers that have exited (the arbiter's reaped-children times), so
``process_cpu_seconds_total`` only goes up. Without the variable (a test's in-process app) the
process's own registry is served.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from worker import metrics

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def register(app: Flask) -> None:
    """Count every request (call before the app's other ``before_request`` hooks, so auth is timed)."""
    metrics.record_build_info()

    @app.before_request
    def _started() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _answered(response: Response) -> Response:
        started = g.get("metrics_started")
        if started is not None:
            rule = request.url_rule
            route = rule.rule if rule is not None else "unmatched"
            method = request.method if request.method in METHODS else "other"
            metrics.HTTP_REQUESTS.labels(route, method, str(response.status_code)).inc()
            metrics.HTTP_LATENCY.labels(route, method).observe(time.perf_counter() - started)
        return response


def registry() -> Any:
    """What ``GET /metrics`` serves: the server's processes summed, or this process alone."""
    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    summed = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(summed)  # type: ignore[no-untyped-call]
    summed.register(ServerProcesses())
    return summed


# --- process_* for a whole gunicorn server -----------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3, the state, first)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def children(parent: int) -> list[int]:
    """Live child processes of ``parent`` (a scan of ``/proc``: the ``children`` file is often missing)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                found.append(int(entry.name))
    return found


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class ServerProcesses:
    """``process_*`` of the gunicorn arbiter (this process's parent) and all its workers, summed."""

    def collect(self) -> Iterator[Any]:
        arbiter = os.getppid()
        own = _stat(arbiter)
        if own is None:  # no /proc (not Linux): no process metrics rather than wrong ones
            return
        pids = [arbiter, *children(arbiter)]
        cpu = sum(int(x) for x in own[11:15]) / _TICKS  # utime, stime, cutime, cstime: exited workers too
        rss = 0
        virtual = 0
        fds = 0
        for pid in pids:
            fields = _stat(pid)
            if fields is None:
                continue
            if pid != arbiter:
                cpu += (int(fields[11]) + int(fields[12])) / _TICKS
            virtual += int(fields[20])
            rss += int(fields[21]) * _PAGE
            fds += _open_fds(pid)
        yield CounterMetricFamily(
            "process_cpu_seconds", "CPU time of the API server's processes (the arbiter and workers).", cpu
        )
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of the API server's processes.", rss)
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory of the API processes.", virtual)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors of the API server's processes.", fds)
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start of the API server (its arbiter), seconds since the epoch.",
            _boot_time() + int(own[19]) / _TICKS,
        )
        yield GaugeMetricFamily("gpujobs_api_processes", "Live worker processes of the API server.", len(pids) - 1)
