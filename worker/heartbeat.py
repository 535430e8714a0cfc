"""Each worker process records who it is and what it holds every few seconds.

Host, pid, queues, slots (its concurrency: the scheduler's capacity), device (GPU name, memory and
utilisation, read from NVML where the host has it),
loaded models (with load and batch counters), current jobs. The dashboard and ``/metrics`` read it; a worker silent for
longer than ``worker_lost_seconds`` shows as lost. The times are the database's (``db.clock``), as is the
time they are compared with, so a worker whose host clock is off is neither lost nor alive by mistake.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import Any

from db.clock import db_now
from db.models import WorkerProcess
from db.session import session_scope
from db.settings import get_settings
from worker import nvml

log = logging.getLogger(__name__)

_running: set[str] = set()
_running_lock = threading.Lock()


def job_started(job_id: str) -> None:
    with _running_lock:
        _running.add(job_id)


def job_ended(job_id: str) -> None:
    with _running_lock:
        _running.discard(job_id)


_NO_NVML = object()
_nvml: Any = None  # the pynvml module once loaded, or _NO_NVML on a host without it


def _nvml_module() -> Any | None:
    global _nvml
    if _nvml is None:
        _nvml = nvml.load() or _NO_NVML
    return None if _nvml is _NO_NVML else _nvml


def device_info() -> dict[str, Any]:
    """The accelerator: from NVML on a GPU host (the whole device: other processes' memory too, and its
    utilisation; no CUDA context needed), else from torch without importing it if no job has (the
    API-like diagnostic worker stays light). ``memory_allocated_mb`` is this process's own share."""
    torch = sys.modules.get("torch")
    library = _nvml_module()
    if library is not None and (summary := nvml.device_summary(library)) is not None:
        if torch is not None and hasattr(torch, "cuda") and torch.cuda.is_initialized():
            summary["memory_allocated_mb"] = round(torch.cuda.memory_allocated() / 2**20)
        return summary
    if torch is None or not hasattr(torch, "cuda"):  # not imported yet, or being imported by a job
        return {"type": "unknown", "note": "torch not loaded yet"}
    if not torch.cuda.is_available():
        return {"type": "cpu"}
    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return {
        "type": "cuda",
        "name": torch.cuda.get_device_name(index),
        "memory_used_mb": round((total - free) / 2**20),
        "memory_total_mb": round(total / 2**20),
        "memory_allocated_mb": round(torch.cuda.memory_allocated(index) / 2**20),
    }


def loaded_models() -> dict[str, Any]:
    cache_module = sys.modules.get("worker.models.cache")
    if cache_module is None or cache_module._cache is None:
        return {}
    loaded: dict[str, Any] = cache_module._cache.loaded()
    return loaded


class Heartbeat:
    def __init__(self, worker_id: str, queues: list[str], slots: int = 1, warming: bool = False) -> None:
        self.worker_id = worker_id
        self.queues = queues
        self.slots = slots  # jobs it runs at once: the scheduler's capacity (``worker.dispatcher``)
        self.warming = warming  # loading and warming its models (``worker.warm``): no slots for the scheduler
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self, stopped: bool = False) -> None:
        with _running_lock:
            current = sorted(_running)
        with session_scope() as session:
            now = db_now(session)
            row = session.get(WorkerProcess, self.worker_id)
            if row is None:
                row = WorkerProcess(id=self.worker_id, hostname=socket.gethostname(), pid=os.getpid(), started_at=now)
                session.add(row)
            row.queues = self.queues
            row.slots = self.slots
            row.warming = self.warming and not stopped
            row.device = device_info()
            row.models = loaded_models()
            row.current_jobs = current
            row.last_seen_at = now
            row.stopped_at = now if stopped else None

    def warmed(self) -> None:
        """Warm: say so now (its slots count from this beat on), not at the next period."""
        self.warming = False
        self.beat()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.beat(stopped=True)
        except Exception as exc:
            log.warning("could not record the worker's stop: %s", exc)

    def _loop(self) -> None:
        interval = get_settings().heartbeat_seconds
        while not self._stop.wait(interval):
            try:
                self.beat()
            except Exception as exc:  # the database may blip; the next beat tries again
                log.warning("heartbeat failed: %s", exc)
